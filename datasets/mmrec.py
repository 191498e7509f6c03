"""The MMRec format (docs/protocol.md, "Formats"): ``<name>.inter`` plus ``image_feat.npy`` / ``audio_feat.npy`` /
``text_feat.npy``.

``<name>.inter`` is tab-separated with a header; the columns ``userID``, ``itemID`` and ``x_label`` are read (0
train, 1 validation, 2 test) and others are ignored. Ids are 0-based in separate spaces. Without an ``x_label``
column the interactions are split 8:1:1 per user. ``U = 1 + max userID`` and
``I = max(1 + max itemID, feature rows)``; a feature file whose row count is not ``I`` is an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .base import MODALITIES, SPLITS, DatasetError, RecDataset
from .formats import register_format
from .safeio import load_npy, present, sha256_file
from .split import split_per_user
from .validate import MAX_ID, canonical_pairs, validate

__all__ = ["FEATURE_FILES", "find_inter_file", "load_mmrec", "looks_mmrec", "write_mmrec"]

FEATURE_FILES = {"v": "image_feat.npy", "a": "audio_feat.npy", "t": "text_feat.npy"}
COLUMNS = ("userID", "itemID", "x_label")


def find_inter_file(root: Path, name: str | None = None) -> Path:
    """The ``<name>.inter`` file of a directory (the only one, or the named one)."""
    if name is not None:
        file = root / f"{name}.inter"
        if not present(file):
            raise DatasetError(file, "missing required file", f"{name}.inter in {root}")
        return file
    found = [file for file in sorted(root.glob("*.inter")) if present(file)]
    if not found:
        raise DatasetError(root / "<name>.inter", "missing required file", f"one *.inter file in {root}")
    if len(found) > 1:
        raise DatasetError(root, f"several .inter files ({', '.join(f.name for f in found)})",
                           "one, or name= to choose")
    return found[0]


def _read_inter(file: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(file, sep="\t", usecols=lambda column: column in COLUMNS)
    except Exception as error:
        raise DatasetError(file, f"not a readable tab-separated table ({type(error).__name__}: {error})",
                           "a header line and tab-separated rows") from None
    for column in COLUMNS[:2]:
        if column not in table.columns:
            raise DatasetError(file, f"no {column} column (columns: {', '.join(map(str, table.columns)) or 'none'})",
                               "tab-separated columns userID, itemID and x_label")
    for column in table.columns:
        if len(table) and not pd.api.types.is_integer_dtype(table[column]):
            raise DatasetError(file, f"column {column} has dtype {table[column].dtype} (non-integer or missing values)",
                               "integer values in every row")
    return table


def looks_mmrec(root: Path) -> bool:
    """Whether ``root`` holds a ``*.inter`` file."""
    return any(root.glob("*.inter"))


@register_format("mmrec", detect=looks_mmrec, title="MMRec", looks_like="a *.inter file", order=20)
def load_mmrec(
    path: str | Path,
    *,
    drop_leaking_pairs: bool = False,
    name: str | None = None,
    num_users: int | None = None,
    num_items: int | None = None,
    split_seed: int = 0,
) -> RecDataset:
    """Load a dataset in the MMRec layout (see the module docstring).

    Args:
        path: the dataset directory.
        drop_leaking_pairs: drop held-out pairs that duplicate training pairs (with a warning) instead of failing.
        name: which ``<name>.inter`` to read when the directory has several.
        num_users, num_items: override ``U`` and ``I``.
        split_seed: seed of the 8:1:1 split when there is no ``x_label`` column.

    Raises:
        DatasetError: any problem of docs/protocol.md, "Validation", naming the file.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(root, "not a directory", "a dataset directory in the MMRec layout")
    inter = find_inter_file(root, name)
    table = _read_inter(inter)
    pairs = table[["userID", "itemID"]].to_numpy(dtype=np.int64).reshape(-1, 2)
    read = [inter]
    features = {}
    sources = {key: str(inter) for key in SPLITS}
    for m in MODALITIES:
        file = root / FEATURE_FILES[m]
        if present(file):  # absent: the dataset has no such modality; present but unreadable: an error
            features[m] = load_npy(file)
            sources[m] = str(file)
            read.append(file)
    if pairs.size and pairs.min() < 0:
        row = int(np.argmax((pairs < 0).any(axis=1)))
        raise DatasetError(inter, f"negative id in data row {row + 1}: {pairs[row].tolist()}", "ids >= 0")
    if pairs.size and pairs.max() > MAX_ID:
        row = int(np.argmax((pairs > MAX_ID).any(axis=1)))
        raise DatasetError(inter, f"id too large in data row {row + 1}: {pairs[row].tolist()}", f"ids in 0..{MAX_ID}")
    users = num_users if num_users is not None else int(pairs[:, 0].max(initial=-1)) + 1
    rows = [int(x.shape[0]) for x in features.values() if getattr(x, "ndim", 0) >= 1]
    items = num_items if num_items is not None else max([int(pairs[:, 1].max(initial=-1)) + 1, *rows])

    split_seed_used, pre_dropped = None, 0
    if "x_label" in table.columns:
        labels = table["x_label"].to_numpy()
        bad = ~np.isin(labels, (0, 1, 2))
        if bad.any():
            raise DatasetError(inter, f"x_label {labels[bad][0]} in data row {int(np.argmax(bad)) + 1}",
                               "0 (train), 1 (validation) or 2 (test)")
        splits = {key: pairs[labels == code] for code, key in enumerate(SPLITS)}
    else:
        width = max(items, int(pairs[:, 1].max(initial=-1)) + 1)
        unique, _, pre_dropped = canonical_pairs(pairs, width)
        split = split_per_user(unique, max(users, int(unique[:, 0].max(initial=-1)) + 1), split_seed)
        splits = {"train": split.train, "val": split.val, "test": split.test}
        split_seed_used = split_seed
    return validate(
        name=inter.stem,
        source_format="mmrec",
        path=str(root.resolve()),
        num_users=users,
        num_items=items,
        splits=splits,
        sources=sources,
        features=features,
        drop_leaking_pairs=drop_leaking_pairs,
        checksums={file.name: sha256_file(file) for file in read},
        split_seed=split_seed_used,
        pre_dropped_duplicates={"train": pre_dropped},
    )


def write_mmrec(dataset: RecDataset, path: str | Path, name: str) -> None:
    """Write ``dataset`` as ``<path>/<name>.inter`` (userID, itemID, x_label) and ``*_feat.npy`` (float32).

    Raises:
        ValueError: the dataset has word-id text, which the MMRec layout cannot hold.
    """
    if dataset.word_bags is not None:
        raise ValueError("the MMRec layout has no word-id text: write it with write_official instead")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    blocks = [
        np.column_stack([dataset.split(key).numpy(), np.full(dataset.split(key).shape[0], code, dtype=np.int64)])
        for code, key in enumerate(SPLITS)
    ]
    table = pd.DataFrame(np.concatenate(blocks), columns=list(COLUMNS))
    table.to_csv(root / f"{name}.inter", sep="\t", index=False)
    for m, feature in dataset.features.items():
        np.save(root / FEATURE_FILES[m], feature.detach().cpu().numpy().astype(np.float32), allow_pickle=False)
