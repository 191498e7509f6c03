"""A plugin that adds one of each extension point: a dataset format, a metric and a report section.

``tests/test_registries.py`` loads it with ``--plugin`` (the way a user would) and runs it end to end; the examples of
docs/extending.md are taken from here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from grcn_bench.benchmarks.metrics import RankedLists, register_metric
from grcn_bench.datasets import RecDataset, register_format
from grcn_bench.datasets.safeio import load_npy, sha256_file
from grcn_bench.datasets.split import split_per_user
from grcn_bench.datasets.validate import validate
from grcn_bench.reports.bundle import Bundle, ReportContext, register_section
from grcn_bench.reports.tables import Table


# A dataset format: a directory with interactions.csv ("user,item" rows after a header) and item_features.npy.
def looks_csv(root: Path) -> bool:
    return (root / "interactions.csv").is_file()


@register_format("csv", detect=looks_csv, looks_like="interactions.csv")
def load_csv(path: str | Path, *, num_users: int | None = None, num_items: int | None = None,
             drop_leaking_pairs: bool = False, split_seed: int = 0) -> RecDataset:
    """(user, item) pairs in interactions.csv, split 8:1:1 per user; item_features.npy as the visual modality."""
    root = Path(path)
    pairs_file, features_file = root / "interactions.csv", root / "item_features.npy"
    pairs = np.loadtxt(pairs_file, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    features = {"v": load_npy(features_file)}
    num_users = num_users or int(pairs[:, 0].max()) + 1
    num_items = num_items or features["v"].shape[0]
    split = split_per_user(pairs, num_users, split_seed)
    return validate(
        name=root.name, source_format="csv", path=str(root.resolve()), num_users=num_users, num_items=num_items,
        splits={"train": split.train, "val": split.val, "test": split.test},
        sources={"train": str(pairs_file), "val": str(pairs_file), "test": str(pairs_file), "v": str(features_file)},
        features=features, drop_leaking_pairs=drop_leaking_pairs, split_seed=split_seed,
        checksums={file.name: sha256_file(file) for file in (pairs_file, features_file)},
    )


# A metric: hit rate, 1 when the top K hold at least one held-out positive.
@register_metric("hit", title="HR", short="HR")
def hit_rate(ranked: RankedLists, k: int) -> torch.Tensor:
    """1 when the top K hold a positive, else 0."""
    return (ranked.hits_at(k) > 0).to(torch.float64)


# A report section: finished cells per dataset, from the results as a DataFrame, after the protocol audit.
@register_section("cells_per_dataset", order=650)
def cells_per_dataset(bundle: Bundle, context: ReportContext) -> None:
    """How many cells finished ok on each dataset."""
    frame = context.frame
    done = frame[frame.status == "ok"]
    if done.empty:
        return  # nothing to show: the section is left out
    bundle.heading("Cells per dataset")
    rows = [(dataset, [str(count)]) for dataset, count in done.groupby("dataset").size().items()]
    bundle.table("cells_per_dataset", Table("Finished cells per dataset", "dataset", [("", ["cells"])], rows))
