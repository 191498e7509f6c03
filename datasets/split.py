"""Per-user random splitting of unsplit interactions (docs/protocol.md, "Splitting and noise injection")."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Split", "split_per_user", "split_sizes"]

TRAIN, VAL, TEST = 0, 1, 2


class Split(NamedTuple):
    """The three splits, plus ``assignment [n]`` (0 train, 1 val, 2 test) aligned with the input pairs.

    Anything aligned with the input (e.g. noise labels) follows the edges with ``labels[split.assignment == 0]``;
    each split keeps the input order of its pairs.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    assignment: np.ndarray


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5).astype(np.int64)


def split_sizes(counts: np.ndarray, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """``[U, 3]`` (train, val, test) sizes per user with ``counts`` interactions.

    Users with fewer than 3 interactions keep all in train. Otherwise validation and test get ``round(ratio * n)``
    (half up), at least 1 each when their ratio is positive, and train gets the rest (at least 1).
    """
    if len(ratios) != 3 or min(ratios) < 0 or ratios[0] <= 0 or not np.isclose(sum(ratios), 1.0):
        raise ValueError(f"ratios must be 3 non-negative numbers summing to 1 with train > 0, got {ratios}")
    counts = np.asarray(counts, dtype=np.int64)
    held = np.zeros((counts.size, 2), dtype=np.int64)
    for column, ratio in enumerate(ratios[1:]):
        if ratio > 0:
            held[:, column] = np.maximum(1, _round_half_up(ratio * counts))
    held[counts < 3] = 0
    # Large held-out ratios could leave no training pair: shrink the larger held-out part first.
    while True:
        excess = held.sum(1) - (counts - 1)
        over = (excess > 0) & (counts >= 3)
        if not over.any():
            break
        column = np.where(held[:, 0] >= held[:, 1], 0, 1)
        held[over, column[over]] -= 1
    return np.column_stack([counts - held.sum(1), held])


def split_per_user(
    pairs: np.ndarray,
    num_users: int,
    seed: int,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Split:
    """Split ``[n, 2]`` (user, item) pairs 8:1:1 per user at random.

    Each user's pairs are shuffled with ``np.random.default_rng(seed)`` and cut by :func:`split_sizes`; the whole
    computation is vectorised (a random key per pair, one sort). The same pairs and seed give the same split.

    Returns:
        :class:`Split` with ``train``, ``val``, ``test`` ``[n_s, 2]`` int64 and ``assignment [n]`` int8.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    users = pairs[:, 0]
    if users.size and (users.min() < 0 or users.max() >= num_users):
        raise ValueError(f"user ids must lie in 0..{num_users - 1}")
    counts = np.bincount(users, minlength=num_users)
    sizes = split_sizes(counts, ratios)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(users.size), users))  # by user, random within user
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(users.size, dtype=np.int64)
    rank[order] = np.arange(users.size) - starts[users[order]]
    # Within a user: the first ``test`` ranks go to test, the next ``val`` to validation, the rest to train.
    n_test, n_val = sizes[users, 2], sizes[users, 1]
    assignment = np.full(users.size, TRAIN, dtype=np.int8)
    assignment[rank < n_test + n_val] = VAL
    assignment[rank < n_test] = TEST
    return Split(pairs[assignment == TRAIN], pairs[assignment == VAL], pairs[assignment == TEST], assignment)
