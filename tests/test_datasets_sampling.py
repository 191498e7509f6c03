"""Uniform negative sampling (docs/protocol.md, "Training"): never a training positive, uniform over the rest,
reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from grcn_bench.datasets import NegativeSampler, generate_synthetic, sample_negatives
from grcn_bench.datasets.base import pairs_to_csr


def test_never_returns_a_training_positive():
    # Densities up to 97% push many positions through rejection and the exact inversion fallback.
    num_users, num_items = 300, 400
    rng = np.random.default_rng(1)
    density = rng.choice([0.001, 0.05, 0.5, 0.9, 0.97], size=num_users)
    owned = rng.random((num_users, num_items)) < density[:, None]
    owned[:, 0] = False  # every user keeps at least one negative
    indptr, items = pairs_to_csr(np.stack(np.nonzero(owned), 1), num_users)
    users = torch.from_numpy(rng.integers(num_users, size=200_000))
    negatives = sample_negatives(indptr, items, users, num_items, torch.Generator().manual_seed(0))
    assert negatives.dtype == torch.int64 and negatives.shape == users.shape
    assert int(negatives.min()) >= 0 and int(negatives.max()) < num_items
    assert not owned[users.numpy(), negatives.numpy()].any()


@pytest.mark.parametrize("density", [0.3, 0.95])  # mostly rejection / mostly inversion
def test_uniform_over_the_non_positives(density):
    num_items = 40
    rng = np.random.default_rng(2)
    owned = rng.random(num_items) < density
    owned[:3] = False
    indptr, items = pairs_to_csr(np.stack([np.zeros(owned.sum(), int), np.flatnonzero(owned)], 1), 1)
    draws = 60_000
    negatives = sample_negatives(indptr, items, torch.zeros(draws, dtype=torch.long), num_items,
                                 torch.Generator().manual_seed(3))
    counts = np.bincount(negatives.numpy(), minlength=num_items)
    assert counts[owned].sum() == 0
    free = np.flatnonzero(~owned)
    assert stats.chisquare(counts[free]).pvalue > 0.001  # equal expected counts


def test_inversion_alone_is_exact():
    """With no rejection rounds every draw goes through the r-th-free-item inversion; check it by hand."""
    indptr = np.array([0, 3, 3])
    items = np.array([0, 2, 3])  # user 0 owns 0, 2, 3 of 6 items: free items are 1, 4, 5
    sampler = NegativeSampler(indptr, items, num_items=6, rejection_rounds=0)
    draws = sampler(torch.zeros(30_000, dtype=torch.long), torch.Generator().manual_seed(0))
    counts = np.bincount(draws.numpy(), minlength=6)
    assert counts[[0, 2, 3]].sum() == 0
    assert stats.chisquare(counts[[1, 4, 5]]).pvalue > 0.001
    empty_user = sampler(torch.ones(5_000, dtype=torch.long), torch.Generator().manual_seed(1))
    assert set(empty_user.tolist()) == set(range(6))


def test_same_seed_same_draws():
    data = generate_synthetic("tiny")
    indptr, items = data.user_items("train")
    users = data.train[:, 0]
    a = sample_negatives(indptr, items, users, data.num_items, torch.Generator().manual_seed(7))
    b = sample_negatives(indptr, items, users, data.num_items, torch.Generator().manual_seed(7))
    c = sample_negatives(indptr, items, users, data.num_items, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    sampler = NegativeSampler(torch.from_numpy(indptr), torch.from_numpy(items), data.num_items)
    assert torch.equal(sampler(users, torch.Generator().manual_seed(7)), a)


def test_user_with_every_item_is_an_error():
    indptr, items = np.array([0, 1, 4]), np.array([2, 0, 1, 2])
    with pytest.raises(ValueError, match="user 1 has every one of the 3 items"):
        sample_negatives(indptr, items, torch.tensor([0, 1]), 3, torch.Generator())
    with pytest.raises(ValueError, match="user ids must lie in 0..1"):
        sample_negatives(indptr, items, torch.tensor([2]), 3, torch.Generator())
    assert sample_negatives(indptr, items, torch.tensor([], dtype=torch.long), 3, torch.Generator()).numel() == 0


def test_tiktok_scale_draws():
    """600k draws at Tiktok's size: correct (speed is measured, not asserted)."""
    rng = np.random.default_rng(0)
    num_users, num_items, num_pairs = 36_656, 76_085, 580_000
    keys = np.unique(rng.integers(num_users, size=num_pairs) * num_items + rng.integers(num_items, size=num_pairs))
    pairs = np.stack([keys // num_items, keys % num_items], 1)
    indptr, items = pairs_to_csr(pairs, num_users)
    sampler = NegativeSampler(indptr, items, num_items)
    users = torch.from_numpy(pairs[:, 0]).repeat(2)[:600_000]
    negatives = sampler(users, torch.Generator().manual_seed(0))
    query = users.numpy() * num_items + negatives.numpy()
    position = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    assert not (keys[position] == query).any()
