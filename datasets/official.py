"""The GRCN / MMGCN official file format (docs/protocol.md, "Formats"): what the authors' code reads.

Layout of a dataset directory:

- ``train.npy``: int ``[E, 2]`` rows ``[user, item]`` with item ids offset by ``U``; or, when absent,
  ``user_item_train_dict.npy``: a pickled ``{user: set(items)}`` (the authors' later repositories);
- ``val_full.npy``, ``test_full.npy``: object arrays with one row per user, ``[user, item, item, ...]``; rows with
  no items are skipped. When both are absent the training pairs are split 8:1:1 per user;
- ``user_item_dict.npy`` (optional, redundant): checked against the training pairs, never trusted;
- features, row ``k`` = item ``k``: ``FeatureVideo_normal.npy`` / ``FeatureAudio_avg_normal.npy`` /
  ``FeatureText_stl_normal.npy`` (Movielens names) or ``feat_v.pt`` / ``feat_a.pt`` / ``feat_t.pt`` (Tiktok, Kwai)
  or ``feat_v.npy`` / ``feat_a.npy`` / ``feat_t.npy`` (CLCRec). An integer ``2 x K`` textual file is word-id text
  (``(item row, word id)`` pairs; docs/protocol.md, "Word-id text").

``U`` and ``I`` are not stored (the authors hard-coded them): ``U = 1 + max user id`` over all splits,
``I`` = feature rows when there are dense features, else ``1 + max item id`` after removing the offset; both can be
overridden. Item ids are offset when every item id is ``>= U``; the card records which variant was read.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import numpy as np
import torch

from .base import MODALITIES, DatasetError, RecDataset
from .formats import register_format
from .safeio import load_npy, load_pt, present, sha256_file
from .split import split_per_user
from .validate import canonical_pairs, check_pairs, validate

__all__ = ["FEATURE_FILES", "load_official", "looks_official", "write_official"]

#: Accepted file names per modality, in the order they are looked for; at most one may be present.
FEATURE_FILES: dict[str, tuple[str, ...]] = {
    "v": ("FeatureVideo_normal.npy", "feat_v.pt", "feat_v.npy"),
    "a": ("FeatureAudio_avg_normal.npy", "feat_a.pt", "feat_a.npy"),
    "t": ("FeatureText_stl_normal.npy", "feat_t.pt", "feat_t.npy"),
}
TRAIN_FILES = ("train.npy", "user_item_train_dict.npy")
HELD_OUT_FILES = {"val": "val_full.npy", "test": "test_full.npy"}


def check_expansion(total: int, where: str, max_ids: int | None) -> None:
    """Refuse a pickle that expands to more ids than its file has bytes. A pickle spells every int out (at least
    two bytes each), but a shared reference to a list costs two bytes however long the list: without the bound an
    80 kB file could expand to 4e8 ids and all of the host's memory."""
    if max_ids is not None and total > max_ids:
        raise DatasetError(where, f"expands to {total:,} ids from {max_ids:,} bytes (shared references?)",
                           "at most one id per byte of the file")


def rows_to_pairs(rows: np.ndarray, where: str, max_ids: int | None = None) -> np.ndarray:
    """``[n, 2]`` pairs from per-user rows ``[user, item, ...]`` (an object array of lists, or a 2-D int array).
    ``max_ids``: the most ids the rows may hold in all (:func:`check_expansion`)."""
    if rows.dtype.kind in "iu" and rows.ndim == 2:
        rows = list(rows)
    elif rows.dtype.hasobject and rows.ndim == 1:
        rows = rows.tolist()
    else:
        raise DatasetError(where, f"array of dtype {rows.dtype} and shape {rows.shape}",
                           "a 1-D object array of [user, item, ...] lists")
    try:
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    except TypeError:
        bad = next(k for k, row in enumerate(rows) if not hasattr(row, "__len__"))
        raise DatasetError(where, f"row {bad} is a {type(rows[bad]).__name__}", "[user, item, ...] lists") from None
    check_expansion(int(lengths.sum()), where, max_ids)
    flat = np.asarray(list(chain.from_iterable(rows)))
    if flat.size and flat.dtype.kind not in "iu":
        raise DatasetError(where, f"ids of type {flat.dtype} in the rows", "integer user and item ids")
    flat = flat.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    counts = np.maximum(lengths - 1, 0)
    users = np.repeat(flat[starts[lengths > 0]], counts[lengths > 0])
    is_user = np.zeros(flat.size, dtype=bool)
    is_user[starts[lengths > 0]] = True
    return np.stack([users, flat[~is_user]], axis=1)


def dict_to_pairs(value: np.ndarray, where: str, max_ids: int | None = None) -> np.ndarray:
    """``[n, 2]`` pairs from a pickled ``{user: set(items)}`` (a 0-d object array, as ``np.save`` writes a dict).
    ``max_ids``: the most ids it may hold in all (:func:`check_expansion`)."""
    mapping = value.item() if value.dtype.hasobject and value.shape == () else value
    if not isinstance(mapping, dict):
        raise DatasetError(where, f"holds a {type(mapping).__name__}", "a dict {user: set(items)}")
    try:
        lengths = np.fromiter(map(len, mapping.values()), dtype=np.int64, count=len(mapping))
    except TypeError:
        raise DatasetError(where, "a value is not a collection of items", "a dict {user: set(items)}") from None
    check_expansion(int(lengths.sum()) + len(mapping), where, max_ids)
    users = np.asarray(list(mapping.keys()))
    items = np.asarray(list(chain.from_iterable(mapping.values())))
    for label, ids in (("user", users), ("item", items)):
        if ids.size and ids.dtype.kind not in "iu":
            raise DatasetError(where, f"{label} ids of type {ids.dtype}", "integer ids")
    if not users.size:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.stack([np.repeat(users.astype(np.int64), lengths), items.astype(np.int64)], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # set order is an accident of hashing


def _find_features(root: Path) -> dict[str, Path]:
    found = {}
    for m, names in FEATURE_FILES.items():
        files = [root / name for name in names if present(root / name)]
        if len(files) > 1:
            raise DatasetError(files[1], f"second feature file for modality {m} (also {files[0].name})",
                               "one file per modality")
        if files:
            found[m] = files[0]
    return found


def _load_feature(path: Path) -> np.ndarray | torch.Tensor:
    return load_pt(path) if path.suffix == ".pt" else load_npy(path)


def _is_word_ids(value: np.ndarray | torch.Tensor) -> bool:
    return (not value.is_floating_point()) if isinstance(value, torch.Tensor) else value.dtype.kind in "iu"


def looks_official(root: Path) -> bool:
    """Whether ``root`` holds an official training file (``train.npy`` or ``user_item_train_dict.npy``)."""
    return any((root / name).is_file() for name in TRAIN_FILES)


@register_format("official", detect=looks_official, looks_like=" or ".join(TRAIN_FILES), order=10)
def load_official(
    path: str | Path,
    *,
    num_users: int | None = None,
    num_items: int | None = None,
    drop_leaking_pairs: bool = False,
    split_seed: int = 0,
    offset: bool | None = None,
) -> RecDataset:
    """Load a dataset in the GRCN / MMGCN official format (see the module docstring).

    Args:
        path: the dataset directory.
        num_users: ``U`` when the files do not show it (the last users have no interactions).
        num_items: ``I`` when the files do not show it; must equal the feature rows when there are features.
        drop_leaking_pairs: drop held-out pairs that duplicate training pairs (with a warning) instead of failing.
        split_seed: seed of the 8:1:1 split when the directory has no ``val_full.npy`` / ``test_full.npy``.
        offset: force whether item ids are offset by ``U`` (default: detected).

    Raises:
        DatasetError: any problem of docs/protocol.md, "Validation", naming the file.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(root, "not a directory", "a dataset directory in the official format")
    read: list[Path] = []
    train_file = next((root / name for name in TRAIN_FILES if present(root / name)), None)
    if train_file is None:
        raise DatasetError(root / TRAIN_FILES[0], "missing required file", f"{' or '.join(TRAIN_FILES)} in {root}")
    held_present = {key: present(root / name) for key, name in HELD_OUT_FILES.items()}
    if any(held_present.values()) and not all(held_present.values()):
        missing = next(key for key, present in held_present.items() if not present)
        raise DatasetError(root / HELD_OUT_FILES[missing], "missing required file",
                           "both val_full.npy and test_full.npy, or neither (unsplit data)")

    raw: dict[str, np.ndarray] = {}
    sources = {"train": str(train_file)}
    train_value = load_npy(train_file)
    read.append(train_file)
    raw["train"] = check_pairs(train_value if train_file.name == "train.npy"
                               else dict_to_pairs(train_value, str(train_file), train_file.stat().st_size),
                               str(train_file))
    if all(held_present.values()):
        for key, name in HELD_OUT_FILES.items():
            sources[key] = str(root / name)
            rows = load_npy(root / name)
            raw[key] = check_pairs(rows_to_pairs(rows, sources[key], (root / name).stat().st_size), sources[key])
            read.append(root / name)

    all_pairs = np.concatenate(list(raw.values()))
    users = num_users if num_users is not None else int(all_pairs[:, 0].max(initial=-1)) + 1
    is_offset = offset if offset is not None else bool(all_pairs.size and all_pairs[:, 1].min() >= users)
    shift = users if is_offset else 0
    for key in raw:
        raw[key] = raw[key] - np.array([0, shift])
        if raw[key].size and raw[key][:, 1].min() < 0:
            raise DatasetError(sources[key], f"item id below the offset {shift}", f"item ids {shift}..{shift}+I-1")

    features: dict[str, np.ndarray | torch.Tensor] = {}
    word_ids = None
    for m, file in _find_features(root).items():
        value = _load_feature(file)
        read.append(file)
        sources[m] = str(file)
        if m == "t" and _is_word_ids(value):
            word_ids = value
        else:
            features[m] = value
    if num_items is not None:
        items = num_items
    elif features:
        items = int(next(iter(features.values())).shape[0])
    else:
        item_ids = [int(pairs[:, 1].max(initial=-1)) for pairs in raw.values()]
        if word_ids is not None and word_ids.shape[-1] and len(word_ids.shape) == 2:
            item_ids.append(int(word_ids[0].max()))
        items = max(item_ids) + 1

    for name in ("user_item_dict.npy", "user_item_train_dict.npy"):
        if present(root / name) and root / name != train_file:
            _check_redundant_dict(root / name, raw["train"], users, items, shift)
            read.append(root / name)

    split_seed_used, pre_dropped = None, 0
    if not all(held_present.values()):
        # Deduplicate before splitting, or a repeated pair could land in train and in a held-out split.
        width = max(items, int(raw["train"][:, 1].max(initial=-1)) + 1)
        train, _, pre_dropped = canonical_pairs(raw["train"], width)
        split = split_per_user(train, max(users, int(train[:, 0].max(initial=-1)) + 1), split_seed)
        raw = {"train": split.train, "val": split.val, "test": split.test}
        sources.update(val=f"{train_file} (split seed {split_seed})", test=f"{train_file} (split seed {split_seed})")
        split_seed_used = split_seed
    return validate(
        name=root.resolve().name,
        source_format="official",
        path=str(root.resolve()),
        num_users=users,
        num_items=items,
        splits=raw,
        sources=sources,
        features=features,
        word_bags=word_ids,
        drop_leaking_pairs=drop_leaking_pairs,
        checksums={file.name: sha256_file(file) for file in read},
        ids_offset=is_offset,
        split_seed=split_seed_used,
        pre_dropped_duplicates={"train": pre_dropped},
    )


def _check_redundant_dict(file: Path, train: np.ndarray, num_users: int, num_items: int, shift: int) -> None:
    pairs = dict_to_pairs(load_npy(file), str(file), file.stat().st_size)
    if pairs.size and shift and pairs[:, 1].min() >= shift:
        pairs = pairs - np.array([0, shift])
    if pairs.size and (pairs.min() < 0 or pairs[:, 0].max() >= num_users or pairs[:, 1].max() >= num_items):
        raise DatasetError(file, "ids outside the dataset's users or items", "the training items of each user")
    theirs = np.unique(pairs[:, 0] * num_items + pairs[:, 1])
    ours = np.unique(train[:, 0] * num_items + train[:, 1])
    if theirs.size != ours.size or not np.array_equal(theirs, ours):
        differ = np.setxor1d(theirs, ours).size
        raise DatasetError(file, f"disagrees with the training pairs on {differ} pairs",
                           "exactly the training items of each user")


def _per_user_rows(pairs: np.ndarray, shift: int) -> np.ndarray:
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs = pairs[order]
    users, starts = np.unique(pairs[:, 0], return_index=True)
    groups = np.split(pairs[:, 1] + shift, starts[1:]) if pairs.size else []
    rows = np.empty(len(users), dtype=object)
    for k, (user, items) in enumerate(zip(users.tolist(), groups, strict=True)):
        rows[k] = [user, *items.tolist()]
    return rows


def write_official(
    dataset: RecDataset,
    path: str | Path,
    *,
    offset: bool = True,
    feature_format: str = "pt",
) -> None:
    """Write ``dataset`` in the official format: ``train.npy``, ``val_full.npy``, ``test_full.npy`` and features.

    Args:
        offset: offset item ids by ``U`` in the interaction files, as the authors' files do.
        feature_format: ``"pt"`` writes ``feat_<m>.pt`` (Tiktok / Kwai names), ``"npy"`` the Movielens ``.npy``
            names. Word-id text is always ``feat_t.pt`` (a ``2 x K`` long tensor).

    ``U`` and ``I`` are not stored by this format: reading back infers them, so pass ``num_users`` /
    ``num_items`` to :func:`load_official` when the last users or items have no interactions and no features.
    Noise labels are not part of the format.
    """
    if feature_format not in ("pt", "npy"):
        raise ValueError(f"feature_format must be 'pt' or 'npy', got {feature_format!r}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    shift = dataset.num_users if offset else 0
    np.save(root / "train.npy", dataset.train.numpy() + np.array([0, shift]), allow_pickle=False)
    for key, name in HELD_OUT_FILES.items():
        np.save(root / name, _per_user_rows(dataset.split(key).numpy(), shift), allow_pickle=True)
    for m in MODALITIES:
        if m in dataset.features:
            feature = dataset.features[m].detach().cpu().contiguous()
            if feature_format == "pt":
                torch.save(feature.clone(), root / f"feat_{m}.pt")
            else:
                np.save(root / FEATURE_FILES[m][0], feature.numpy(), allow_pickle=False)
    if dataset.word_bags is not None:
        torch.save(torch.stack([dataset.word_bags.item, dataset.word_bags.word]).cpu(), root / "feat_t.pt")

