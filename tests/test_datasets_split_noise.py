"""Per-user splitting and false-positive injection (docs/protocol.md, "Splitting and noise injection")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grcn_bench.datasets import generate_synthetic, inject_noise, split_per_user
from grcn_bench.datasets.split import split_sizes


def test_split_sizes_by_hand():
    sizes = split_sizes(np.array([0, 1, 2, 3, 4, 10, 15, 20, 25]))
    assert sizes.tolist() == [
        [0, 0, 0], [1, 0, 0], [2, 0, 0],  # fewer than 3: all in train
        [1, 1, 1], [2, 1, 1], [8, 1, 1],
        [11, 2, 2],  # 1.5 rounds half up
        [16, 2, 2], [19, 3, 3],  # 2.5 -> 3
    ]
    assert split_sizes(np.array([10]), (0.9, 0.0, 0.1)).tolist() == [[9, 0, 1]]
    with pytest.raises(ValueError, match="ratios"):
        split_sizes(np.array([5]), (0.5, 0.2, 0.2))


def test_split_per_user():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 40, size=200)
    pairs = np.concatenate([np.stack([np.full(n, u), rng.permutation(1000)[:n]], 1) for u, n in enumerate(counts)])
    pairs = pairs[rng.permutation(len(pairs))]
    split = split_per_user(pairs, 200, seed=3)
    sizes = split_sizes(counts)
    for k, part in enumerate((split.train, split.val, split.test)):
        assert np.bincount(part[:, 0], minlength=200).tolist() == sizes[:, k].tolist()
    # A partition of the input, aligned with the assignment, each split in input order.
    assert np.array_equal(split.train, pairs[split.assignment == 0])
    assert np.array_equal(split.test, pairs[split.assignment == 2])
    assert len(split.train) + len(split.val) + len(split.test) == len(pairs)
    few = counts < 3
    assert not np.isin(split.val[:, 0], np.flatnonzero(few)).any()
    assert not np.isin(split.test[:, 0], np.flatnonzero(few)).any()
    again = split_per_user(pairs, 200, seed=3)
    other = split_per_user(pairs, 200, seed=4)
    assert np.array_equal(again.assignment, split.assignment)
    assert not np.array_equal(other.assignment, split.assignment)


def test_split_is_random_within_user():
    """Every one of a user's 10 items lands in test about equally often across seeds."""
    pairs = np.stack([np.zeros(10, int), np.arange(10)], 1)
    hits = np.zeros(10)
    for seed in range(2000):
        hits[split_per_user(pairs, 1, seed).test[:, 1]] += 1
    assert hits.sum() == 2000 and hits.min() > 140 and hits.max() < 260


def test_split_rejects_bad_users():
    with pytest.raises(ValueError, match="user ids"):
        split_per_user(np.array([[5, 0]]), 3, 0)


@pytest.fixture(scope="module")
def base():
    return generate_synthetic("tiny", noise=0.1)


@pytest.mark.parametrize("sampler", ["popularity", "uniform"])
def test_inject_noise(base, sampler):
    rate = 0.25
    noisy = inject_noise(base, rate, seed=1, sampler=sampler)
    added = int(np.floor(rate * base.train.shape[0] + 0.5))
    assert noisy.train.shape[0] == base.train.shape[0] + added
    assert torch.equal(noisy.val, base.val) and torch.equal(noisy.test, base.test)
    # Existing labels are kept; new pairs are labelled.
    old = {tuple(p): bool(n) for p, n in zip(base.train.tolist(), base.train_noise.tolist(), strict=True)}
    new_pairs = []
    for pair, label in zip(noisy.train.tolist(), noisy.train_noise.tolist(), strict=True):
        if tuple(pair) in old:
            assert label == old[tuple(pair)]
        else:
            assert label
            new_pairs.append(tuple(pair))
    assert len(new_pairs) == len(set(new_pairs)) == added
    # No new pair is an interaction the user has in any split.
    everything = {tuple(p) for p in torch.cat([base.train, base.val, base.test]).tolist()}
    assert not everything & set(new_pairs)
    assert noisy.card.noise_edges == int(base.train_noise.sum()) + added
    assert noisy.card.split_counts["train"] == noisy.train.shape[0]
    assert noisy.card.parameters["noise_sampler"] == sampler and noisy.card.parameters["noise_injected"] == added
    assert base.card.noise_edges == int(base.train_noise.sum())  # the input is untouched
    if sampler == "popularity":  # items never seen in training are never drawn
        seen = set(base.train[:, 1].tolist())
        assert {item for _, item in new_pairs} <= seen


def test_inject_noise_is_seeded(base):
    a, b, c = (inject_noise(base, 0.2, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)


def test_inject_noise_on_unlabelled_data(base):
    import dataclasses

    unlabelled = dataclasses.replace(base, train_noise=None)
    noisy = inject_noise(unlabelled, 0.5, seed=0, sampler="uniform")
    assert int(noisy.train_noise.sum()) == int(np.floor(0.5 * base.train.shape[0] + 0.5))
    assert inject_noise(unlabelled, 0.0, seed=0).train_noise.sum() == 0


def test_inject_noise_errors(base):
    with pytest.raises(ValueError, match="rate must be >= 0"):
        inject_noise(base, -0.1, seed=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        inject_noise(base, 0.1, seed=0, sampler="adversarial")
    with pytest.raises(ValueError, match="could place only"):
        inject_noise(base, 200.0, seed=0, sampler="uniform")  # more pairs than the free cells


def test_directory_spec_injects_labelled_noise(shared_dataset):
    from grcn_bench.datasets import load_dataset

    path = shared_dataset("tiktok_mmrec")
    clean = load_dataset(str(path))
    noisy = load_dataset(f"{path}?inject_noise=0.1&noise_seed=3")
    added = noisy.train.size(0) - clean.train.size(0)
    assert added == round(0.1 * clean.train.size(0))
    assert int(noisy.train_noise.sum()) == added and noisy.card.noise_edges == added
    assert torch.equal(noisy.val, clean.val) and torch.equal(noisy.test, clean.test)
    again = load_dataset(f"{path}?inject_noise=0.1&noise_seed=3")
    assert torch.equal(again.train, noisy.train)


@pytest.mark.parametrize(
    "query, message",
    [("inject_noise=abc", "not a float"), ("inject=0.1", "unknown parameter 'inject'"),
     ("inject_noise=1.5", "between 0 and 1"), ("noise_seed=2", "without inject_noise"),
     ("inject_noise=0.1&noise_sampler=mine", "noise_sampler"), ("inject_noise=0.1&inject_noise=0.2", "twice")],
)
def test_bad_directory_spec_options_are_named(tmp_path, query, message):
    from grcn_bench.datasets import DatasetError, load_dataset

    with pytest.raises(DatasetError, match=message) as err:
        load_dataset(f"{tmp_path}?{query}")
    assert str(tmp_path) in str(err.value)
