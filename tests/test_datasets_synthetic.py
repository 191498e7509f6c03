"""The synthetic generator (docs/protocol.md, "Synthetic data"): determinism, planted structure, noise labels, presets,
specs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from grcn_bench.datasets import PRESETS, DatasetError, generate_synthetic, load_dataset, parse_spec
from grcn_bench.datasets.split import TRAIN, split_per_user
from grcn_bench.datasets.synthetic import (
    _BlockSampler,
    allocate_counts,
    first_occurrences,
    resolve_params,
    sample_distinct,
    simulate,
)

SMALL = {"users": 80, "items": 150, "interactions": 1200}


def _arrays(data):
    out = {s: data.split(s).numpy().tobytes() for s in ("train", "val", "test")}
    out.update({f"feat_{m}": x.numpy().tobytes() for m, x in data.features.items()})
    out["noise"] = data.train_noise.numpy().tobytes()
    if data.word_bags is not None:
        out["words"] = torch.stack([data.word_bags.item, data.word_bags.word]).numpy().tobytes()
    return out


def test_same_parameters_give_byte_identical_arrays():
    assert _arrays(generate_synthetic("tiny", seed=5)) == _arrays(generate_synthetic("tiny", seed=5))
    assert _arrays(generate_synthetic("tiny", text="words")) == _arrays(generate_synthetic("tiny", text="words"))


def test_different_seed_gives_different_data():
    a, b = generate_synthetic("tiny", seed=0), generate_synthetic("tiny", seed=1)
    assert a.train.tolist() != b.train.tolist()
    assert not torch.equal(a.features["v"], b.features["v"])


def test_split_seed_changes_only_the_split():
    a, b = generate_synthetic("tiny", split_seed=0), generate_synthetic("tiny", split_seed=1)
    everything = lambda d: sorted(torch.cat([d.train, d.val, d.test]).tolist())  # noqa: E731
    assert everything(a) == everything(b) and a.test.tolist() != b.test.tolist()
    assert torch.equal(a.features["v"], b.features["v"])


def test_feature_width_does_not_change_interactions():
    """Each part of the world has its own random stream."""
    a = generate_synthetic("tiktok", **SMALL)
    b = generate_synthetic("tiktok", **SMALL, modalities="v")
    assert torch.equal(a.train, b.train) and torch.equal(a.features["v"], b.features["v"])


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.35])
def test_noise_fraction_per_user(noise):
    world = simulate(resolve_params("tiktok", **SMALL, noise=noise))
    per_user = np.bincount(world.pairs[:, 0], minlength=80)
    noisy = np.bincount(world.pairs[world.noise, 0], minlength=80)
    # Stochastic rounding: every user has floor or ceil of noise * n_u false positives.
    assert np.all(noisy >= np.floor(noise * per_user)) and np.all(noisy <= np.ceil(noise * per_user))
    assert abs(world.noise.mean() - noise) < 0.02
    data = generate_synthetic("tiktok", **SMALL, noise=noise)
    assert data.train_noise.dtype == torch.bool and data.train_noise.shape == (data.train.shape[0],)
    assert abs(data.train_noise.float().mean().item() - noise) < 0.03
    assert data.card.noise_edges == int(data.train_noise.sum())
    assert data.card.parameters["heldout_noise_pairs"] == int(world.noise.sum()) - data.card.noise_edges


def test_noise_labels_travel_with_the_edges():
    """The labels of the train split are exactly the world's labels of the pairs that landed in train."""
    params = resolve_params("tiny")
    world = simulate(params)
    split = split_per_user(world.pairs, params.users, params.split_seed)
    data = generate_synthetic("tiny")
    label = {tuple(p): bool(n) for p, n in zip(world.pairs.tolist(), world.noise.tolist(), strict=True)}
    assert [label[tuple(p)] for p in data.train.tolist()] == data.train_noise.tolist()
    assert sorted(map(tuple, split.train.tolist())) == [tuple(p) for p in data.train.tolist()]
    assert world.noise[split.assignment == TRAIN].sum() == data.card.noise_edges


def test_planted_preferences():
    """True edges follow the users' preferences, false positives do not; the true ranking beats popularity."""
    params = resolve_params("tiktok", **SMALL)
    world = simulate(params)
    affinity = world.affinity(np.arange(params.users)) - world.log_pop  # preference part only
    edge_affinity = affinity[world.pairs[:, 0], world.pairs[:, 1]]
    assert edge_affinity[~world.noise].mean() > edge_affinity[world.noise].mean() + 1.0
    data = generate_synthetic("tiktok", **SMALL)
    oracle = _recall_at_10(world.affinity(np.arange(params.users)), data)
    popularity = _recall_at_10(np.tile(np.bincount(data.train[:, 1], minlength=params.items), (params.users, 1)),
                               data)
    assert oracle > 2 * popularity


def _recall_at_10(scores, data):
    scores = np.array(scores, dtype=np.float64)
    for split in ("train", "val"):
        pairs = data.split(split).numpy()
        scores[pairs[:, 0], pairs[:, 1]] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :10]
    recalls = []
    for user in range(data.num_users):
        held = set(data.test[data.test[:, 0] == user, 1].tolist())
        if held:
            recalls.append(len(held & set(top[user].tolist())) / len(held))
    return float(np.mean(recalls))


def test_modalities_show_content_with_different_noise():
    """Feature similarity tracks content similarity, less so for the noisier modality (sigma_a > sigma_v)."""
    params = resolve_params("movielens", **SMALL)
    assert params.sigmas["v"] < params.sigmas["a"]
    world = simulate(params)
    rng = np.random.default_rng(0)
    i, j = rng.integers(params.items, size=(2, 3000))
    i, j = i[i != j], j[i != j]  # a pair with itself would correlate everything through the norms
    content = np.sum(world.content[i] * world.content[j], 1)
    collaborative = np.sum(world.collaborative[i] * world.collaborative[j], 1)
    corr = {}
    for m in ("v", "a"):
        x = world.features[m]
        corr[m] = stats.pearsonr(np.sum(x[i] * x[j], 1), content)[0]
        assert abs(stats.pearsonr(np.sum(x[i] * x[j], 1), collaborative)[0]) < 0.1  # no feature shows c_i
    assert corr["v"] > corr["a"] > 0.3


def test_presets_have_the_papers_modalities():
    expected = {"movielens": {"v": 2048, "a": 128, "t": 100}, "tiktok": {"v": 128, "a": 128, "t": 128},
                "kwai": {"v": 2048}}
    for preset, dims in expected.items():
        assert resolve_params(preset).dims == dims
        data = generate_synthetic(preset, users=20, items=40, interactions=200)
        assert {m: x.shape for m, x in data.features.items()} == {m: (40, d) for m, d in dims.items()}
        assert data.card.modalities == dims
    assert len(resolve_params("tiny").dims) == 2


def test_default_sizes_are_small_and_shaped():
    sizes = {name: (p.users, p.items, p.interactions) for name, p in PRESETS.items()}
    assert sizes["movielens"][0] > sizes["movielens"][1]  # more users than items
    assert sizes["tiktok"][1] > sizes["tiktok"][0]  # many items
    assert sizes["kwai"][2] / sizes["kwai"][0] > sizes["tiktok"][2] / sizes["tiktok"][0]  # heavier users
    for name in ("movielens", "tiktok", "kwai"):
        users, items, interactions = sizes[name]
        assert items <= 3000 and 8000 <= 0.8 * interactions <= 15000


def test_scale():
    full = {"movielens": (55_485, 5_986, 1_239_508), "tiktok": (36_656, 76_085, 726_065),
            "kwai": (7_010, 86_483, 298_492)}
    for preset, sizes in full.items():
        p = resolve_params(preset, scale="full")
        assert (p.users, p.items, p.interactions) == sizes
    half = resolve_params("tiktok", scale=0.5)
    assert (half.users, half.items, half.interactions) == (500, 1250, 6500)
    assert resolve_params("tiktok", scale="full", users=2000).users == 2000


def test_exact_sizes():
    data = generate_synthetic("kwai", users=30, items=200, interactions=900, min_per_user=6)
    assert sum(data.card.split_counts.values()) == 900
    assert (data.num_users, data.num_items) == (30, 200)
    per_user = torch.bincount(torch.cat([data.train, data.val, data.test])[:, 0], minlength=30)
    assert int(per_user.min()) >= 6 and int(per_user.max()) <= 100


def test_word_ids_text():
    data = generate_synthetic("tiny", text="words", vocab=40, words_per_item=5)
    bags = data.word_bags
    assert bags is not None and "t" not in data.features and data.card.modalities["t"] == 64
    assert bags.num_words <= 40 and data.card.text_words == bags.num_words
    assert torch.bincount(bags.item, minlength=data.num_items).min() >= 1  # every item has words
    keys = bags.item * bags.num_words + bags.word
    assert keys.unique().numel() == keys.numel()  # distinct words per item
    assert abs(bags.item.numel() / data.num_items - 5) < 1.0


def test_card():
    data = load_dataset("synthetic:tiny?noise=0.3&seed=7")
    card = data.card
    assert card.source_format == "synthetic" and card.path is None and card.name == "synthetic:tiny?noise=0.3&seed=7"
    assert card.parameters["noise"] == 0.3 and card.parameters["seed"] == 7 and card.parameters["dim"] == 16
    assert card.split_seed == 0 and card.noise_edges == int(data.train_noise.sum())
    other = load_dataset("synthetic:tiny?noise=0.3&seed=7", split_seed=3)
    assert other.card.split_seed == 3 and other.name.endswith("split_seed=3")
    assert card.digest() != other.card.digest()


def test_parse_spec():
    spec = parse_spec("synthetic:tiktok?users=2000&noise=0.3&seed=7&scale=full")
    assert (spec.kind, spec.target) == ("synthetic", "tiktok")
    assert spec.options == {"users": 2000, "noise": 0.3, "seed": 7, "scale": "full"}
    assert parse_spec("/data/movielens").kind == "path"
    with pytest.raises(DatasetError, match=r"unknown synthetic parameter 'colour'.*activity_skew, beta, .*users"):
        parse_spec("synthetic:tiny?colour=red")
    with pytest.raises(DatasetError, match="users='many' is not a valid int"):
        parse_spec("synthetic:tiny?users=many")
    with pytest.raises(DatasetError, match="unknown synthetic preset 'netflix'"):
        parse_spec("synthetic:netflix")
    with pytest.raises(DatasetError, match="given twice"):
        parse_spec("synthetic:tiny?seed=1&seed=2")
    with pytest.raises(DatasetError, match="malformed"):
        parse_spec("synthetic:tiny?seed")


@pytest.mark.parametrize("overrides,fragment", [
    ({"noise": 1.0}, "noise=1.0"),
    ({"interactions": 10}, "10 interactions for 60 users"),
    ({"modalities": "vx"}, "modalities='vx'"),
    ({"text": "pixels"}, "text='pixels'"),
    ({"scale": "full"}, "scale=full is not defined"),
    ({"scale": "-2"}, "scale='-2'"),
    ({"interactions": 700, "per_user": 12.0}, "both interactions and per_user"),
])
def test_invalid_parameters(overrides, fragment):
    with pytest.raises(DatasetError, match=fragment.replace("(", r"\(").replace("?", r"\?")):
        generate_synthetic("tiny", **overrides)


def test_words_need_a_textual_modality():
    with pytest.raises(DatasetError, match="text=words needs the textual modality"):
        generate_synthetic("kwai", text="words")


def test_load_dataset_rejects_directory_options_for_synthetic():
    with pytest.raises(DatasetError, match="directories only"):
        load_dataset("synthetic:tiny", num_users=5)


# ---- the sampling machinery ----------------------------------------------------------------------------------


def _pair_probabilities(weights):
    """Exact law of the unordered pair drawn sequentially without replacement."""
    total = sum(weights)
    out = {}
    for a in range(len(weights)):
        for b in range(a + 1, len(weights)):
            wa, wb = weights[a], weights[b]
            out[(a, b)] = wa / total * wb / (total - wa) + wb / total * wa / (total - wb)
    return out


@pytest.mark.parametrize("rounds", [4, 0])  # rejection rounds, and the Gumbel-top-k fallback alone
def test_sample_distinct_has_the_law_of_sequential_draws(rounds):
    weights = [1.0, 2.0, 3.0, 4.0, 0.0]
    rows = 4000
    matrix = np.zeros((rows, 64), dtype=np.float32)
    matrix[:, :5] = weights
    sampler = _BlockSampler(matrix, 5)
    rng = np.random.default_rng(11)
    got_rows, got_cols = sample_distinct(sampler.draw, sampler.log_weights, np.full(rows, 2), 5, rng, rounds=rounds)
    assert np.array_equal(np.bincount(got_rows, minlength=rows), np.full(rows, 2))
    assert not np.isin(got_cols, [4]).any()  # zero weight is never drawn
    order = np.lexsort((got_cols, got_rows))
    pairs = got_cols[order].reshape(rows, 2)
    assert np.all(pairs[:, 0] != pairs[:, 1])
    law = _pair_probabilities(weights[:4])
    observed = [np.sum((pairs[:, 0] == a) & (pairs[:, 1] == b)) for a, b in law]
    assert stats.chisquare(observed, [rows * p for p in law.values()]).pvalue > 0.001


def test_sample_distinct_respects_exclusions():
    matrix = np.ones((3, 64), dtype=np.float32)
    sampler = _BlockSampler(matrix, 10)
    exclude = np.sort(np.array([0 * 10 + 1, 0 * 10 + 2, 2 * 10 + 9]))
    rows, cols = sample_distinct(sampler.draw, sampler.log_weights, np.array([8, 0, 9]), 10,
                                 np.random.default_rng(0), exclude=exclude)
    assert sorted(cols[rows == 0].tolist()) == [0, 3, 4, 5, 6, 7, 8, 9]
    assert sorted(cols[rows == 2].tolist()) == list(range(9))
    assert (rows == 1).sum() == 0


def test_block_sampler_follows_the_weights_across_blocks():
    rng = np.random.default_rng(3)
    width = 150  # three blocks of 64, the last one padded with zeros
    weights = rng.random(width).astype(np.float32)
    weights[[7, 100]] = 0.0
    matrix = np.zeros((1, 192), dtype=np.float32)
    matrix[0, :width] = weights
    draws = _BlockSampler(matrix, width).draw(np.zeros(200_000, dtype=np.int64), rng)
    counts = np.bincount(draws, minlength=width)
    assert counts.size == width and counts[7] == 0 and counts[100] == 0
    keep = weights > 0
    expected = weights[keep].astype(np.float64)
    expected *= counts.sum() / expected.sum()
    assert stats.chisquare(counts[keep], expected).pvalue > 0.001


def test_allocate_counts():
    weights = np.array([1.0, 1.0, 2.0, 10.0])
    counts = allocate_counts(40, weights, 5, 15)
    assert counts.sum() == 40 and counts.min() >= 5 and counts.max() <= 15
    assert counts[3] == 15 and counts[2] >= counts[0]
    assert allocate_counts(7, np.array([1.0, 3.0]), 0, 10).tolist() == [2, 5]  # 1.75 / 5.25 -> largest remainder
    with pytest.raises(ValueError, match="cannot split 100"):
        allocate_counts(100, weights, 5, 15)


def test_first_occurrences():
    keys = np.array([5, 3, 5, 1, 3, 3, 9])
    assert first_occurrences(keys).tolist() == [True, True, False, True, False, False, True]


@pytest.mark.slow
def test_tiktok_full_scale():
    data = load_dataset("synthetic:tiktok?scale=full")
    assert (data.num_users, data.num_items) == (36_656, 76_085)
    assert sum(data.card.split_counts.values()) == 726_065
    assert math.isclose(data.train_noise.float().mean().item(), 0.2, abs_tol=0.01)
