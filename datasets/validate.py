"""The checks every loader ends with (docs/protocol.md, "Validation"), and the assembly of a :class:`RecDataset` and its
card.

Loaders only parse files into plain arrays; :func:`validate` decides whether the result is usable. Each failure is
one :class:`DatasetError` whose message names the file (``sources[key]``), the problem and what was expected. What
can be repaired without guessing is repaired and counted in the card: duplicate pairs inside a split are dropped,
held-out pairs that leak training pairs are dropped when ``drop_leaking_pairs`` is set, users without training
pairs are kept. Pairs come out in canonical (user, item) order, so the same data read from different layouts gives
identical tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from .base import MODALITIES, SPLITS, DatasetCard, DatasetError, RecDataset, WordBags

__all__ = ["MAX_ID", "WORD_EMBEDDING_DIM", "canonical_pairs", "validate"]

#: Width of the learned word-embedding table that word-id text is averaged through (docs/protocol.md, "Word-id text").
WORD_EMBEDDING_DIM = 64


def _as_numpy(value: np.ndarray | Tensor) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)


#: The largest user or item id accepted. Ids index int32 tables, and (user, item) pair keys ``user * items + item``
#: must not overflow int64: ids near 2**62 gave wrong users or false duplicates once multiplied.
MAX_ID = 2**31 - 1


def check_pairs(pairs: np.ndarray | Tensor, where: str) -> np.ndarray:
    """An integer ``[n, 2]`` array of ids in ``0..MAX_ID``, as int64 (checked before any arithmetic on them)."""
    array = _as_numpy(pairs)
    if array.dtype.kind not in "iu":
        raise DatasetError(where, f"interaction ids have dtype {array.dtype}", "integer user and item ids")
    if array.ndim != 2 or array.shape[1] != 2:
        raise DatasetError(where, f"interaction pairs have shape {array.shape}", "[n, 2] rows of (user, item)")
    if array.dtype.kind == "u" and array.size and int(array.max()) > MAX_ID:  # before a cast could wrap it
        row = int(np.argmax((array > MAX_ID).any(axis=1)))
        raise DatasetError(where, f"id too large in pair {row}: {array[row].tolist()}", f"ids in 0..{MAX_ID}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        row = int(np.argmax((array < 0).any(axis=1)))
        raise DatasetError(where, f"negative id in pair {row}: {array[row].tolist()}", "ids >= 0")
    if array.size and array.max() > MAX_ID:
        row = int(np.argmax((array > MAX_ID).any(axis=1)))
        raise DatasetError(where, f"id too large in pair {row}: {array[row].tolist()}", f"ids in 0..{MAX_ID}")
    return array


def check_id_range(pairs: np.ndarray, num_users: int, num_items: int, where: str) -> None:
    for column, (label, bound) in enumerate((("user", num_users), ("item", num_items))):
        bad = np.flatnonzero(pairs[:, column] >= bound)
        if bad.size:
            raise DatasetError(
                where,
                f"{bad.size} {label} ids out of range (e.g. {label} {int(pairs[bad[0], column])})",
                f"{label} ids in 0..{bound - 1}",
            )


def canonical_pairs(
    pairs: np.ndarray, num_items: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Sort pairs by (user, item) and drop duplicates (keeping the first label): ``(pairs, labels, dropped)``."""
    keys = pairs[:, 0] * num_items + pairs[:, 1]
    unique, first = np.unique(keys, return_index=True)
    out = np.stack([unique // num_items, unique % num_items], axis=1) if unique.size else pairs[:0].copy()
    return out, (labels[first] if labels is not None else None), int(pairs.shape[0] - unique.size)


def _pair_keys(pairs: np.ndarray, num_items: int) -> np.ndarray:
    return pairs[:, 0] * num_items + pairs[:, 1]


def check_feature_shape(value: np.ndarray | Tensor, where: str) -> np.ndarray:
    """A float ``[I, D]`` feature matrix with ``I, D > 0`` (any row count)."""
    array = _as_numpy(value)
    if array.dtype.kind != "f":
        raise DatasetError(where, f"features have dtype {array.dtype}", "floating-point features")
    if array.ndim != 2:
        raise DatasetError(where, f"features have shape {array.shape}", "a 2-D [items, dims] matrix")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DatasetError(where, f"modality is empty: shape {array.shape}", "at least one row and one dimension")
    return array


def check_dense_feature(value: np.ndarray | Tensor, num_items: int, where: str) -> Tensor:
    """A finite float ``[I, D]`` feature matrix with ``I, D > 0``, as a float32 tensor."""
    array = check_feature_shape(value, where)
    if array.shape[0] != num_items:
        raise DatasetError(where, f"feature row count {array.shape[0]} differs from the item count", f"{num_items}")
    # float16 inputs are widened first: their non-finite values survive the conversion unchanged.
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        row = int(torch.nonzero(~finite)[0, 0])
        raise DatasetError(where, f"{bad} NaN or infinite feature values (first in row {row})", "finite values")
    return tensor


def check_word_bags(value: WordBags | np.ndarray | Tensor, num_items: int, where: str) -> WordBags:
    """Word-id text: a ``2 x K`` integer array of (item row, word id), or a :class:`WordBags`."""
    if isinstance(value, WordBags):
        array = torch.stack([value.item, value.word]).numpy()
        declared = value.num_words
    else:
        array, declared = _as_numpy(value), None
    if array.dtype.kind not in "iu":
        raise DatasetError(where, f"word-id text has dtype {array.dtype}", "an integer 2 x K (item, word) array")
    if array.ndim != 2 or array.shape[0] != 2:
        raise DatasetError(where, f"word-id text has shape {array.shape}", "2 x K rows (item row, word id)")
    if array.shape[1] == 0:
        raise DatasetError(where, "modality is empty: no (item, word) pairs", "at least one pair")
    array = array.astype(np.int64, copy=False)
    if array.min() < 0:
        raise DatasetError(where, "negative item row or word id in word-id text", "ids >= 0")
    if array[0].max() >= num_items:
        raise DatasetError(
            where, f"word-id text names item row {int(array[0].max())}", f"item rows in 0..{num_items - 1}"
        )
    num_words = int(array[1].max()) + 1
    if declared is not None and declared < num_words:
        raise DatasetError(where, f"word id {num_words - 1} outside the declared vocabulary", f"< {declared}")
    return WordBags(torch.from_numpy(array[0].copy()), torch.from_numpy(array[1].copy()), declared or num_words)


def validate(
    *,
    name: str,
    source_format: str,
    path: str | None,
    num_users: int,
    num_items: int,
    splits: Mapping[str, np.ndarray | Tensor],
    sources: Mapping[str, str],
    features: Mapping[str, np.ndarray | Tensor] | None = None,
    word_bags: WordBags | np.ndarray | Tensor | None = None,
    train_noise: np.ndarray | Tensor | None = None,
    drop_leaking_pairs: bool = False,
    checksums: Mapping[str, str] | None = None,
    ids_offset: bool | None = None,
    split_seed: int | None = None,
    parameters: Mapping[str, object] | None = None,
    pre_dropped_duplicates: Mapping[str, int] | None = None,
) -> RecDataset:
    """Check parsed data against docs/protocol.md, "Validation", and assemble the dataset and its card.

    Args:
        splits: ``"train"``, ``"val"``, ``"test"`` -> integer ``[n, 2]`` (user, item) pairs, 0-based ids.
        sources: what to name in messages for each split and modality key (file path, or a spec string).
        features: dense modality -> ``[I, D]`` float array (float16 / float64 are converted to float32).
        word_bags: word-id text (``2 x K`` (item, word) array or :class:`WordBags`); the ``"t"`` modality.
        train_noise: bool ``[n_train]`` labels of planted / injected false positives, aligned with ``splits["train"]``.
        drop_leaking_pairs: drop (with a warning) held-out pairs that duplicate training pairs instead of failing.
        pre_dropped_duplicates: duplicates a loader already removed (e.g. before splitting), added to the card.

    Raises:
        DatasetError: one per problem, naming ``sources[key]``.
    """
    features = dict(features or {})
    for key in SPLITS:
        if key not in splits:
            raise DatasetError(sources.get(key, name), f"no {key} split", "train, val and test pairs")
    # Problems a loader's size inference cannot see come first: they explain a zero size better than the sizes do.
    for m in MODALITIES:
        if m in features:
            check_feature_shape(features[m], sources.get(m, name))
    if check_pairs(splits["train"], sources.get("train", name)).shape[0] == 0:
        raise DatasetError(sources.get("train", name), "training split is empty", "at least one training pair")
    if num_users <= 0 or num_items <= 0:
        raise DatasetError(name, f"{num_users} users x {num_items} items", "at least one user and one item")
    unknown = set(features) - set(MODALITIES)
    if unknown or (word_bags is not None and "t" in features):
        raise DatasetError(name, f"modalities {sorted(features)} (+ word-id text: {word_bags is not None})",
                           "modalities among v, a, t, each given once")

    cleaned: dict[str, np.ndarray] = {}
    duplicates: dict[str, int] = {}
    labels = None if train_noise is None else _as_numpy(train_noise).astype(bool).reshape(-1)
    for key in SPLITS:
        where = sources.get(key, name)
        pairs = check_pairs(splits[key], where)
        check_id_range(pairs, num_users, num_items, where)
        if key == "train" and labels is not None and labels.shape[0] != pairs.shape[0]:
            raise DatasetError(where, f"{labels.shape[0]} noise labels for {pairs.shape[0]} pairs", "one per pair")
        pairs, split_labels, duplicates[key] = canonical_pairs(pairs, num_items, labels if key == "train" else None)
        if key == "train":
            labels = split_labels
        cleaned[key] = pairs
    for key, count in (pre_dropped_duplicates or {}).items():
        duplicates[key] += int(count)

    train_keys = _pair_keys(cleaned["train"], num_items)
    leaking: dict[str, int] = {}
    for key in ("val", "test"):
        leak = np.isin(_pair_keys(cleaned[key], num_items), train_keys, assume_unique=True)
        leaking[key] = int(leak.sum())
        if not leaking[key]:
            continue
        where = sources.get(key, name)
        user, item = cleaned[key][np.flatnonzero(leak)[0]].tolist()
        if not drop_leaking_pairs:
            raise DatasetError(
                where,
                f"{leaking[key]} pairs duplicate training pairs (e.g. user {user}, item {item})",
                "held-out pairs disjoint from train; drop_leaking_pairs=True drops them",
            )
        warnings.warn(f"{where}: dropped {leaking[key]} pairs that duplicate training pairs", stacklevel=2)
        cleaned[key] = cleaned[key][~leak]
    # A test pair that is also a validation pair is masked at test time (validation items are), so it could never be
    # a hit and would only lower recall: it is dropped from test, with a warning, and counted on the card.
    overlap = np.isin(_pair_keys(cleaned["test"], num_items), _pair_keys(cleaned["val"], num_items))
    if overlap.any():
        warnings.warn(f"{sources.get('test', name)}: dropped {int(overlap.sum())} test pairs that are also validation "
                      "pairs", stacklevel=2)
        cleaned["test"] = cleaned["test"][~overlap]

    dense = {m: check_dense_feature(features[m], num_items, sources.get(m, name)) for m in MODALITIES if m in features}
    bags = None if word_bags is None else check_word_bags(word_bags, num_items, sources.get("t", name))
    modalities = {m: int(x.shape[1]) for m, x in dense.items()}
    if bags is not None:
        modalities["t"] = WORD_EMBEDDING_DIM
    modalities = {m: modalities[m] for m in MODALITIES if m in modalities}

    users_with_train = np.unique(cleaned["train"][:, 0]).size
    card = DatasetCard(
        name=name,
        source_format=source_format,
        path=path,
        num_users=int(num_users),
        num_items=int(num_items),
        split_counts={key: int(cleaned[key].shape[0]) for key in SPLITS},
        modalities=modalities,
        checksums=dict(checksums or {}),
        split_seed=split_seed,
        ids_offset=ids_offset,
        duplicates_dropped=duplicates,
        leaking_pairs_dropped=leaking,  # all zero unless drop_leaking_pairs (a leak is an error otherwise)
        val_test_overlap_dropped=int(overlap.sum()),
        users_without_train=int(num_users - users_with_train),
        text_words=bags.num_words if bags is not None else None,
        noise_edges=int(labels.sum()) if labels is not None else None,
        parameters=dict(parameters or {}),
    )
    return RecDataset(
        name=name,
        num_users=int(num_users),
        num_items=int(num_items),
        train=torch.from_numpy(cleaned["train"]),
        val=torch.from_numpy(cleaned["val"]),
        test=torch.from_numpy(cleaned["test"]),
        features=dense,
        card=card,
        word_bags=bags,
        train_noise=torch.from_numpy(labels) if labels is not None else None,
    )
