"""The extension registries (docs/extending.md): dataset formats, metrics and report sections, each added by one
function, from a plugin too, and used end to end; and their error paths.

Every test that registers something restores the registries afterwards, so the built-in formats, metrics and
sections are all that the other test modules see.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grcn_bench.benchmarks import metrics as metrics_module
from grcn_bench.benchmarks.cli import main
from grcn_bench.benchmarks.executors import load_plugins
from grcn_bench.benchmarks.metrics import (
    RankedLists,
    available_metrics,
    get_metric,
    metric_names,
    rank_metrics,
    register_metric,
    unregister_metric,
)
from grcn_bench.benchmarks.store import ResultStore
from grcn_bench.datasets import (
    DatasetError,
    available_formats,
    detect_format,
    generate_synthetic,
    load_dataset,
    parse_spec,
    register_format,
    write_official,
)
from grcn_bench.datasets import formats as formats_module
from grcn_bench.reports import bundle as bundle_module
from grcn_bench.reports.bundle import available_sections, register_section, unregister_section, write_report
from grcn_bench.reports.tables import METRIC_TITLES, SHORT_TITLES, table_metrics

PLUGIN = Path(__file__).with_name("registries_plugin.py")
BUILTIN_SECTIONS = ["title", "table2", "table3", "fig3", "fig4", "noise", "audit", "training_curves", "selection",
                    "status", "cards", "environment", "timings"]


@pytest.fixture
def registries():
    """Restore the three registries (and forget the plugin module) after the test."""
    saved = (dict(formats_module._REGISTRY), dict(metrics_module._METRICS), dict(bundle_module._SECTIONS))
    yield
    for registry, before in zip((formats_module._REGISTRY, metrics_module._METRICS, bundle_module._SECTIONS), saved,
                                strict=True):
        registry.clear()
        registry.update(before)
    for name in [n for n, m in sys.modules.items() if getattr(m, "__file__", None) == str(PLUGIN.resolve())]:
        del sys.modules[name]


def csv_dataset(root: Path) -> Path:
    """``synthetic:tiny``'s interactions and visual features in the plugin's CSV format."""
    data = generate_synthetic("tiny")
    pairs = torch.cat([data.train, data.val, data.test]).numpy()
    root.mkdir(parents=True)
    np.savetxt(root / "interactions.csv", pairs, fmt="%d", delimiter=",", header="user,item", comments="")
    np.save(root / "item_features.npy", data.features["v"].numpy())
    return root


# ---------------------------------------------------------------------------------------------------------------
# What is registered without plugins


def test_the_built_in_entries_are_registered_in_their_order():
    assert available_formats() == ["official", "mmrec", "synthetic"]
    assert available_metrics() == ("precision", "recall", "ndcg")
    assert available_sections() == BUILTIN_SECTIONS
    assert table_metrics() == ("precision@10", "recall@10", "ndcg@10")
    assert dict(SHORT_TITLES) == {"precision@10": "P@10", "recall@10": "R@10", "ndcg@10": "NDCG@10"}
    assert dict(METRIC_TITLES) == {"precision@10": "Precision", "recall@10": "Recall", "ndcg@10": "NDCG"}


# ---------------------------------------------------------------------------------------------------------------
# Dataset formats


def test_a_plugin_format_is_detected_and_loaded_with_the_directory_options(registries, tmp_path):
    load_plugins([str(PLUGIN)])
    root = csv_dataset(tmp_path / "shop")
    assert available_formats() == ["official", "mmrec", "synthetic", "csv"]
    assert detect_format(root) == "csv"
    data = load_dataset(str(root))
    tiny = generate_synthetic("tiny")
    assert (data.card.source_format, data.num_users, data.num_items) == ("csv", tiny.num_users, tiny.num_items)
    assert set(data.card.checksums) == {"interactions.csv", "item_features.npy"}
    # The directory options (noise injection) apply to every directory format unchanged.
    noisy = load_dataset(f"{root}?inject_noise=0.1&noise_seed=1")
    assert noisy.train.shape[0] > data.train.shape[0] and int(noisy.train_noise.sum()) > 0
    # A directory nothing recognises: the message lists what every format looks for, the plugin's too.
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no dataset files found.*train.npy.*\.inter.*interactions.csv \(csv"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match=r"unknown format 'parquet'.*official, mmrec, csv"):
        load_dataset(str(root), format="parquet")


def test_a_directory_two_formats_recognise_is_refused_unless_format_chooses(registries, tmp_path):
    load_plugins([str(PLUGIN)])
    root = csv_dataset(tmp_path / "both")
    write_official(generate_synthetic("tiny"), root)
    with pytest.raises(DatasetError, match=r"several formats: official .* and csv \(interactions.csv\).*format="):
        load_dataset(str(root))
    assert load_dataset(str(root), format="csv").card.source_format == "csv"
    assert load_dataset(str(root), format="official").card.source_format == "official"


def test_a_format_name_is_registered_once(registries):
    def load(path, **options):
        raise AssertionError("never called")

    register_format("once", detect=lambda root: False)(load)
    register_format("once", detect=formats_module.get_format("once").detect)(load)  # the same entry again: a no-op
    with pytest.raises(ValueError, match="dataset format named 'official' is already registered"):
        register_format("official", detect=lambda root: False)(load)
    with pytest.raises(ValueError, match="specs starting with synthetic: already belong to the dataset format 'synth"):
        register_format("other_synthetic", scheme="synthetic")(load)
    with pytest.raises(TypeError, match="exactly one of detect= .* or scheme="):
        register_format("neither")
    with pytest.raises(TypeError, match="exactly one of detect="):
        register_format("both", detect=lambda root: False, scheme="both")
    with pytest.raises(ValueError, match="without ':'"):
        register_format("colon", scheme="a:b")


def test_a_detector_that_raises_is_named_in_the_error(registries, tmp_path):
    def broken(root: Path) -> bool:
        raise OSError("permission denied")

    register_format("broken", detect=broken)(lambda path, **options: None)
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match=r"the 'broken' format's detector raised OSError: permission denied"):
        load_dataset(str(tmp_path / "d"))
    # format= skips detection, so the other formats stay usable.
    official = tmp_path / "official"
    write_official(generate_synthetic("tiny"), official)
    assert load_dataset(str(official), format="official").card.source_format == "official"


def test_a_scheme_format_owns_its_spec_prefix(registries):
    def parse(body: str, spec: str) -> tuple[str, dict]:
        name, _, seed = body.partition("@")
        return name, {"seed": int(seed or 0)}

    @register_format("toy", scheme="toy", parse=parse, looks_like="toy:<preset>[@seed]")
    def load_toy(target, options, **settings):
        return generate_synthetic(target, seed=options["seed"])

    spec = parse_spec("toy:tiny@3")
    assert (spec.kind, spec.target, spec.options) == ("toy", "tiny", {"seed": 3})
    assert load_dataset("toy:tiny@3").name == generate_synthetic("tiny", seed=3).name
    with pytest.raises(DatasetError, match="directories only"):
        load_dataset("toy:tiny", format="official")
    with pytest.raises(DatasetError, match=r"no such dataset directory.*synthetic:<preset> or toy:<preset>\[@seed\]"):
        load_dataset("/nonexistent/toy")


# ---------------------------------------------------------------------------------------------------------------
# Metrics

HITS = torch.tensor([[True, False, True], [False, True, False], [False, False, False]])
NUM_POS = torch.tensor([5, 1, 2])


def test_a_registered_metric_is_computed_after_the_built_in_ones_which_do_not_change(registries):
    before = rank_metrics(HITS, NUM_POS, (1, 3))
    load_plugins([str(PLUGIN)])
    after = rank_metrics(HITS, NUM_POS, (1, 3))
    assert list(after) == ["precision@1", "recall@1", "ndcg@1", "hit@1", "precision@3", "recall@3", "ndcg@3",
                           "hit@3"]
    assert after["hit@1"].tolist() == [1.0, 0.0, 0.0] and after["hit@3"].tolist() == [1.0, 1.0, 0.0]
    assert after["hit@3"].dtype == torch.float64
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert list(rank_metrics(HITS, NUM_POS, 3, metrics=("hit", "recall"))) == ["recall@3", "hit@3"]
    assert table_metrics() == ("precision@10", "recall@10", "ndcg@10", "hit@10")
    assert (METRIC_TITLES["hit@10"], SHORT_TITLES["hit@10"]) == ("HR", "HR@10")


def test_metric_registration_and_lookup_errors(registries):
    def constant(ranked: RankedLists, k: int) -> torch.Tensor:
        return torch.zeros(ranked.hits.size(0), dtype=torch.float64)

    register_metric("zero")(constant)
    register_metric("zero")(constant)  # the same entry again: a no-op
    with pytest.raises(ValueError, match="metric named 'recall' is already registered"):
        register_metric("recall")(constant)
    for bad in ("hit@10", "", " hit", "test_hit"):
        with pytest.raises(ValueError, match="a metric name is a word"):
            register_metric(bad)
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['map'\]"):
        metric_names(10, metrics=("map",))
    with pytest.raises(ValueError, match="unknown metric"):
        rank_metrics(HITS, NUM_POS, 3, metrics=("map",))
    with pytest.raises(KeyError, match="unknown metric 'map'; available metrics: precision, recall, ndcg, zero"):
        get_metric("map@10")
    assert get_metric("recall@20").title == "Recall"
    register_metric("shapeless")(lambda ranked, k: torch.zeros(1))
    with pytest.raises(ValueError, match=r"metric 'shapeless' returned Tensor \(1,\); expected a \[3\] tensor"):
        rank_metrics(HITS, NUM_POS, 3)
    unregister_metric("shapeless")
    unregister_metric("zero")
    assert available_metrics() == ("precision", "recall", "ndcg")


# ---------------------------------------------------------------------------------------------------------------
# Report sections


def test_section_names_are_registered_once(registries):
    def nothing(bundle, context):
        return None

    register_section("nothing", order=1)(nothing)
    register_section("nothing", order=1)(nothing)  # the same entry again: a no-op
    with pytest.raises(ValueError, match="report section named 'nothing' is already registered"):
        register_section("nothing", order=2)(nothing)
    with pytest.raises(ValueError, match="report section named 'table2' is already registered"):
        register_section("table2", order=100)(nothing)
    assert available_sections()[:2] == ["title", "nothing"]


# ---------------------------------------------------------------------------------------------------------------
# End to end: the plugin's format, metric and section in one run through the command line


def test_a_plugin_format_metric_and_section_work_end_to_end(registries, tmp_path, capsys):
    data = csv_dataset(tmp_path / "shop")
    out = tmp_path / "results"
    assert main(["run", "--plugin", str(PLUGIN), "--models", "mf", "--datasets", str(data), "--seeds", "0",
                 "--lr", "0.01", "--reg", "1e-4", "--max-epochs", "2", "--patience", "2", "--out", str(out),
                 "--no-progress"]) == 0
    store = ResultStore(out)
    (cell_id,) = store.cell_ids()
    result = store.read(cell_id)
    assert result["status"] == "ok" and result["dataset_card"]["source_format"] == "csv"
    # The metric is evaluated, stored with the others (validation, test, per user) and shown in Table 2.
    assert {"precision@10", "recall@10", "ndcg@10", "hit@10", "hit@20"} <= set(result["test_metrics"])
    assert "hit@10" in result["val_metrics"]
    assert 0 <= result["test_metrics"]["hit@10"] <= 1
    arrays = store.read_arrays(cell_id)
    assert arrays["test_hit@10"].shape == arrays["test_recall@10"].shape
    text = (out / "report.md").read_text()
    table2 = (out / "report" / "table2.csv").read_text()
    assert f"hit@10,{result['test_metrics']['hit@10']!r}" in table2
    header = next(line for line in text.splitlines() if line.startswith("| Model"))
    assert [cell.strip() for cell in header.split("|")[2:6]] == [f"shop {title}" for title in
                                                               ("Precision", "Recall", "NDCG", "HR")]
    # The section sits where its order puts it: after the paper's items, before the training curves.
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headings.index("Cells per dataset") == headings.index("Training curves") - 1
    assert (out / "report" / "cells_per_dataset.csv").read_text().splitlines()[1] == f"{data},1"

    # `report` with the same plugin writes the same report; leaving a section out drops exactly its part.
    capsys.readouterr()
    assert main(["report", str(out), "--plugin", str(PLUGIN)]) == 0
    assert (out / "report.md").read_text() == text
    unregister_section("cells_per_dataset")
    write_report(out)
    without = (out / "report.md").read_text()
    start, end = text.index("## Cells per dataset"), text.index("## Training curves")
    assert without == text[:start] + text[end:]
