"""False-positive injection for the noise-robustness experiment on any dataset (docs/protocol.md, "Splitting and noise
injection")."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import SPLITS, RecDataset
from .validate import canonical_pairs

__all__ = ["SAMPLERS", "inject_noise"]

SAMPLERS = ("popularity", "uniform")


def inject_noise(dataset: RecDataset, rate: float, seed: int, sampler: str = "popularity") -> RecDataset:
    """A copy of ``dataset`` with ``round(rate * |train|)`` labelled false-positive training pairs added.

    Each new pair joins a random user and an item that user has in no split (train, validation or test), and no
    pair is added twice. The user is drawn in proportion to their training degree, so every user's neighbourhood
    receives about ``rate`` noise, as in the synthetic generator; the item is drawn in proportion to its
    training popularity (``sampler="popularity"``) or uniformly (``"uniform"``). Pairs are drawn jointly and
    rejected when taken, so the result follows those weights restricted to the free pairs.

    Existing noise labels are kept (unknown labels count as ``False``); validation and test are untouched. The card
    records ``noise_edges`` and the injection parameters.

    Raises:
        ValueError: a negative rate, an unknown sampler, or more pairs requested than can be placed.
    """
    if rate < 0:
        raise ValueError(f"rate must be >= 0, got {rate}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    num_users, num_items = dataset.num_users, dataset.num_items
    train = dataset.train.numpy()
    count = int(np.floor(rate * train.shape[0] + 0.5))
    taken = np.unique(np.concatenate([s.numpy() for s in (dataset.train, dataset.val, dataset.test)]) @ [num_items, 1])
    owned = np.bincount(taken // num_items, minlength=num_users)
    user_weight = np.bincount(train[:, 0], minlength=num_users).astype(np.float64)
    user_weight[owned >= num_items] = 0.0  # nothing left to give them
    item_weight = (np.bincount(train[:, 1], minlength=num_items).astype(np.float64) if sampler == "popularity"
                   else np.ones(num_items))
    rng = np.random.default_rng(seed)
    added = _draw_free_pairs(count, user_weight, item_weight, taken, rng)

    labels = (dataset.train_noise.numpy() if dataset.train_noise is not None
              else np.zeros(train.shape[0], dtype=bool))
    pairs, labels, _ = canonical_pairs(
        np.concatenate([train, added]), num_items, np.concatenate([labels, np.ones(count, dtype=bool)])
    )
    card = dataclasses.replace(
        dataset.card,
        split_counts={key: (pairs.shape[0] if key == "train" else dataset.card.split_counts[key]) for key in SPLITS},
        users_without_train=int(num_users - np.unique(pairs[:, 0]).size),
        noise_edges=int(labels.sum()),
        parameters={**dataset.card.parameters, "noise_injected": count, "noise_rate": rate, "noise_seed": seed,
                    "noise_sampler": sampler},
    )
    return dataclasses.replace(
        dataset, train=torch.from_numpy(pairs), train_noise=torch.from_numpy(labels), card=card, _graph=None
    )


def _draw_free_pairs(count: int, user_weight: np.ndarray, item_weight: np.ndarray, taken: np.ndarray,
                     rng: np.random.Generator, max_rounds: int = 200) -> np.ndarray:
    """``count`` distinct (user, item) pairs outside the sorted keys ``taken``, drawn by vectorised rejection."""
    num_items = item_weight.size
    if count == 0:
        return np.empty((0, 2), dtype=np.int64)
    # Count the free cells first: asking for more than exist is an error, not a long loop.
    taken_users, taken_items = taken // num_items, taken % num_items
    owned_drawable = np.bincount(taken_users[item_weight[taken_items] > 0], minlength=user_weight.size)
    free = int(((user_weight > 0) * ((item_weight > 0).sum() - owned_drawable)).sum())
    if count > free:
        raise ValueError(f"could place only {free} of {count} false-positive pairs: too few free pairs")
    user_cdf, item_cdf = np.cumsum(user_weight), np.cumsum(item_weight)
    accepted = np.empty(0, dtype=np.int64)
    for _ in range(max_rounds):
        missing = count - accepted.size
        if missing == 0:
            break
        users = np.searchsorted(user_cdf, rng.random(missing) * user_cdf[-1], side="right")
        items = np.searchsorted(item_cdf, rng.random(missing) * item_cdf[-1], side="right")
        keys = np.minimum(users, user_weight.size - 1) * num_items + np.minimum(items, num_items - 1)
        first = np.zeros(keys.size, dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True
        fresh = first & ~np.isin(keys, taken) & ~np.isin(keys, accepted)
        accepted = np.concatenate([accepted, keys[fresh]])
    if accepted.size < count:
        raise ValueError(f"could place only {accepted.size} of {count} false-positive pairs: too few free pairs")
    return np.stack([accepted // num_items, accepted % num_items], axis=1)
