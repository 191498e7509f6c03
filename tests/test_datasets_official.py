"""The official GRCN / MMGCN format (docs/protocol.md, "Formats"): the authors' real files, and write/read round
trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grcn_bench.datasets import generate_synthetic, load_dataset, write_official
from grcn_bench.datasets.official import load_official
from grcn_bench.datasets.safeio import load_npy


def _sorted_pairs(users, items):
    pairs = np.stack([np.asarray(users, np.int64), np.asarray(items, np.int64)], 1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _assert_matches_npz(data, npz_path):
    """Our pairs (canonical order) equal the independently derived 0-based pairs of ``interactions.npz``."""
    with np.load(npz_path, allow_pickle=False) as npz:
        assert (data.num_users, data.num_items) == (int(npz["n_users"]), int(npz["n_items"]))
        for split in ("train", "val", "test"):
            expected = _sorted_pairs(npz[f"{split}_user"], npz[f"{split}_item"])
            assert np.array_equal(data.split(split).numpy(), expected), split


@pytest.fixture(scope="module")
def movielens(shared_dataset):
    return load_dataset(str(shared_dataset("movielens_clcrec")))


def test_movielens_counts(movielens):
    card = movielens.card
    assert card.source_format == "official" and card.ids_offset is True
    assert movielens.num_users == 55_485
    assert card.split_counts == {"train": 922_007, "val": 149_366, "test": 174_487}
    # No features: I = 1 + max item id after removing the offset, which is the authors' 5,986.
    assert movielens.num_items == 5_986
    assert card.users_without_train == 0 and card.duplicates_dropped == {"train": 0, "val": 0, "test": 0}
    assert set(card.checksums) == {"user_item_train_dict.npy", "val_full.npy", "test_full.npy"}
    assert movielens.features == {} and movielens.word_bags is None and movielens.train_noise is None


def test_movielens_matches_derived_npz(movielens, shared_dataset):
    _assert_matches_npz(movielens, shared_dataset("movielens_clcrec") / "interactions.npz")


def test_movielens_first_row_by_hand(movielens, shared_dataset):
    """val_full.npy's first row is [0, 55790, 55835]: user 0 with items 305 and 350 once the offset is removed."""
    row = load_npy(shared_dataset("movielens_clcrec") / "val_full.npy")[0]
    assert list(row) == [0, 55_790, 55_835]
    val = movielens.val.numpy()
    assert val[val[:, 0] == 0].tolist() == [[0, 305], [0, 350]]


def test_amazon_counts_and_npz(shared_dataset):
    root = shared_dataset("amazon_clcrec")
    data = load_official(root)
    assert (data.num_users, data.num_items) == (27_044, 86_506)
    assert data.card.split_counts == {"train": 143_529, "val": 28_875, "test": 28_875}
    # train.npy is read; the redundant user_item_train_dict.npy is checked against it.
    assert {"train.npy", "user_item_train_dict.npy"} <= set(data.card.checksums)
    _assert_matches_npz(data, root / "interactions.npz")


def test_num_users_items_overrides(tmp_path):
    data = generate_synthetic("tiny", modalities="v")
    write_official(data, tmp_path, offset=False)
    loaded = load_official(tmp_path, num_users=data.num_users + 3, offset=False)
    assert loaded.num_users == data.num_users + 3 and loaded.card.users_without_train == 3


def _assert_same(a, b):
    assert (a.num_users, a.num_items) == (b.num_users, b.num_items)
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split), b.split(split)), split
    assert a.features.keys() == b.features.keys()
    for m in a.features:
        assert b.features[m].dtype == torch.float32 and torch.equal(a.features[m], b.features[m]), m


@pytest.mark.parametrize("feature_format", ["pt", "npy"])
@pytest.mark.parametrize("offset", [True, False])
def test_round_trip_dense(tmp_path, feature_format, offset):
    data = generate_synthetic("tiny", seed=3)
    assert set(data.features) == {"v", "t"}
    write_official(data, tmp_path, offset=offset, feature_format=feature_format)
    loaded = load_dataset(str(tmp_path))
    _assert_same(data, loaded)
    assert loaded.card.ids_offset is offset
    names = {"pt": {"feat_v.pt", "feat_t.pt"}, "npy": {"FeatureVideo_normal.npy", "FeatureText_stl_normal.npy"}}
    assert names[feature_format] <= set(loaded.card.checksums)


def test_round_trip_word_ids(tmp_path):
    data = generate_synthetic("tiny", text="words", seed=1)
    assert data.word_bags is not None and "t" not in data.features
    write_official(data, tmp_path)
    raw = torch.load(tmp_path / "feat_t.pt", weights_only=True)
    assert raw.dtype == torch.long and raw.shape[0] == 2  # the Tiktok 2 x K layout
    loaded = load_dataset(str(tmp_path))
    _assert_same(data, loaded)
    assert torch.equal(loaded.word_bags.item, data.word_bags.item)
    assert torch.equal(loaded.word_bags.word, data.word_bags.word)
    assert loaded.word_bags.num_words == data.word_bags.num_words == loaded.card.text_words
    assert loaded.card.modalities == {"v": 16, "t": 64}


def test_written_rows_are_the_authors_layout(tmp_path):
    data = generate_synthetic("tiny")
    write_official(data, tmp_path)
    rows = load_npy(tmp_path / "test_full.npy")
    assert rows.dtype == object
    first = list(rows[0])
    user = first[0]
    expected = sorted(int(i) + data.num_users for u, i in data.test.tolist() if u == user)
    assert first[1:] == expected
    train = np.load(tmp_path / "train.npy", allow_pickle=False)
    assert train.dtype == np.int64 and train[:, 1].min() >= data.num_users


def test_unsplit_directory_is_split_per_user(tmp_path):
    pairs = np.stack([np.repeat(np.arange(5), 10), np.tile(np.arange(10), 5)], 1)
    np.save(tmp_path / "train.npy", np.concatenate([pairs, pairs[:3]]))  # 3 duplicates
    a = load_dataset(str(tmp_path), split_seed=4)
    b = load_dataset(str(tmp_path), split_seed=4)
    c = load_dataset(str(tmp_path), split_seed=5)
    assert a.card.split_seed == 4 and a.card.duplicates_dropped["train"] == 3
    assert a.card.split_counts == {"train": 40, "val": 5, "test": 5}
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split), b.split(split))
    assert not torch.equal(a.test, c.test)
    assert a.card.ids_offset is False  # item 0 < U = 5
