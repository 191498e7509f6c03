"""The bad-input matrix of docs/protocol.md, "Validation": one clear DatasetError per case, naming the file and the
problem."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from grcn_bench.datasets import DatasetError, load_dataset
from grcn_bench.datasets.official import load_official
from grcn_bench.datasets.validate import validate

U, I = 4, 6
TRAIN = [[0, 0], [0, 1], [1, 2], [2, 3], [3, 4], [3, 5]]
VAL = {0: [2], 1: [3]}
TEST = {0: [3], 2: [4]}


def _rows(per_user, offset=U):
    rows = np.empty(len(per_user), dtype=object)
    for k, (user, items) in enumerate(sorted(per_user.items())):
        rows[k] = [user, *[item + offset for item in items]]
    return rows


def official_dir(root, *, train=TRAIN, val=VAL, test=TEST, features=None, offset=U):
    """An official-format directory with item ids offset by ``offset``; ``features``: file name -> array/tensor."""
    root.mkdir(parents=True, exist_ok=True)
    train = np.asarray(train)
    if train.ndim == 2 and train.shape[1] >= 2 and train.dtype.kind in "iu":
        train = train.copy()
        train[:, 1] += offset
    np.save(root / "train.npy", train)
    if val is not None:
        np.save(root / "val_full.npy", _rows(val, offset), allow_pickle=True)
    if test is not None:
        np.save(root / "test_full.npy", _rows(test, offset), allow_pickle=True)
    for name, value in (features or {}).items():
        if name.endswith(".pt"):
            torch.save(value, root / name)
        else:
            np.save(root / name, value)
    return root


def _snapshot(root):
    return sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def expect_error(path, *fragments, **kwargs):
    """Load ``path``; assert one DatasetError whose message has every fragment, and that nothing was written."""
    before = _snapshot(path.parent)
    cwd_before = sorted(os.listdir(os.getcwd()))
    with pytest.raises(DatasetError) as error:
        load_official(path, **kwargs)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message
    assert _snapshot(path.parent) == before
    assert sorted(os.listdir(os.getcwd())) == cwd_before
    return message


def test_valid_directory_loads(tmp_path):
    data = load_official(official_dir(tmp_path / "ok"))
    assert (data.num_users, data.num_items) == (U, I)
    assert data.train.tolist() == TRAIN
    assert data.val.tolist() == [[0, 2], [1, 3]] and data.test.tolist() == [[0, 3], [2, 4]]
    assert data.card.ids_offset is True


def test_missing_required_files(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "train.npy", "missing required file", "user_item_train_dict.npy")
    expect_error(official_dir(tmp_path / "no_test", test=None), "test_full.npy", "missing required file")
    expect_error(tmp_path / "nowhere", "nowhere", "not a directory")


def test_load_dataset_on_unknown_directory_lists_what_it_looked_for(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no dataset files found.*train.npy.*user_item_train_dict.npy.*\.inter"):
        load_dataset(str(tmp_path / "d"))


def test_wrong_dtype_and_shape(tmp_path):
    expect_error(official_dir(tmp_path / "f", train=np.asarray(TRAIN, dtype=np.float64)), "train.npy",
                 "dtype float64")
    expect_error(official_dir(tmp_path / "s", train=np.zeros((3, 3), dtype=np.int64)), "train.npy", "shape (3, 3)")
    rows = tmp_path / "r"
    official_dir(rows)
    np.save(rows / "val_full.npy", np.asarray([1.5, 2.5]))
    expect_error(rows, "val_full.npy", "dtype float64")
    bad_items = tmp_path / "b"
    official_dir(bad_items)
    objects = np.empty(1, dtype=object)
    objects[0] = [0, "item"]
    np.save(bad_items / "test_full.npy", objects, allow_pickle=True)
    expect_error(bad_items, "test_full.npy", "ids of type")
    feats = {"feat_v.pt": torch.ones(I, 3, dtype=torch.long)}
    expect_error(official_dir(tmp_path / "fi", features=feats), "feat_v.pt", "dtype int64", "floating-point")
    words = {"feat_t.pt": torch.zeros(3, 5, dtype=torch.long)}
    expect_error(official_dir(tmp_path / "w", features=words), "feat_t.pt", "word-id text has shape (3, 5)")
    flat = {"feat_a.pt": torch.ones(I)}
    expect_error(official_dir(tmp_path / "fl", features=flat), "feat_a.pt", "shape (6,)", "2-D")


def test_negative_and_out_of_range_ids(tmp_path):
    negative = np.asarray(TRAIN)
    negative[2, 0] = -1
    expect_error(official_dir(tmp_path / "n", train=negative), "train.npy", "negative id in pair 2")
    # With features, I is their row count: item 6 (offset 10) is out of range.
    features = {"feat_v.pt": torch.ones(I, 2)}
    expect_error(official_dir(tmp_path / "o", test={0: [I]}, features=features), "test_full.npy",
                 "item ids out of range (e.g. item 6)", "0..5")
    expect_error(official_dir(tmp_path / "u"), "train.npy", "user ids out of range", num_users=3, offset=True)


def test_feature_rows_must_match_items(tmp_path):
    features = {"feat_v.pt": torch.ones(I, 2), "feat_a.pt": torch.ones(I + 1, 2)}
    expect_error(official_dir(tmp_path / "two", features=features), "feat_a.pt", "feature row count 7", "6")
    expect_error(official_dir(tmp_path / "override", features={"feat_v.pt": torch.ones(I, 2)}), "feat_v.pt",
                 "feature row count 6", num_items=8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features(tmp_path, bad):
    feature = np.ones((I, 3), dtype=np.float32)
    feature[4, 1] = bad
    expect_error(official_dir(tmp_path / "x", features={"FeatureVideo_normal.npy": feature}),
                 "FeatureVideo_normal.npy", "1 NaN or infinite feature values (first in row 4)")


def test_empty_modality(tmp_path):
    expect_error(official_dir(tmp_path / "d", features={"feat_v.pt": torch.ones(I, 0)}), "feat_v.pt",
                 "modality is empty")
    expect_error(official_dir(tmp_path / "r", features={"feat_a.pt": torch.ones(0, 4)}), "feat_a.pt",
                 "modality is empty")
    expect_error(official_dir(tmp_path / "w", features={"feat_t.pt": torch.zeros(2, 0, dtype=torch.long)}),
                 "feat_t.pt", "modality is empty")


def test_empty_train(tmp_path):
    expect_error(official_dir(tmp_path / "e", train=np.zeros((0, 2), dtype=np.int64)), "train.npy",
                 "training split is empty", num_users=U, num_items=I)


def test_leaking_pairs_error_or_drop(tmp_path):
    root = official_dir(tmp_path / "leak", val={0: [1, 2], 1: [2, 3]})  # (0, 1) and (1, 2) are training pairs
    expect_error(root, "val_full.npy", "2 pairs duplicate training pairs (e.g. user 0, item 1)", "drop_leaking_pairs")
    with pytest.warns(UserWarning, match="val_full.npy: dropped 2 pairs that duplicate training pairs"):
        data = load_official(root, drop_leaking_pairs=True)
    assert data.val.tolist() == [[0, 2], [1, 3]]
    assert data.card.leaking_pairs_dropped == {"val": 2, "test": 0}


def test_duplicates_dropped_and_counted(tmp_path):
    train = TRAIN + [[0, 1], [3, 5], [3, 5]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # duplicates are repaired silently, only counted
        data = load_official(official_dir(tmp_path / "d", train=train, test={0: [3, 3], 2: [4]}))
    assert data.train.tolist() == TRAIN
    assert data.card.duplicates_dropped == {"train": 3, "val": 0, "test": 1}
    assert data.card.split_counts == {"train": 6, "val": 2, "test": 2}


def test_users_without_train_are_kept_and_counted(tmp_path):
    data = load_official(official_dir(tmp_path / "u", val={0: [2], 5: [3]}, offset=6))
    assert data.num_users == 6 and data.card.users_without_train == 2  # users 4 and 5
    assert [5, 3] in data.val.tolist()


def test_float16_features_become_float32(tmp_path):
    feature = np.linspace(0, 1, I * 2, dtype=np.float16).reshape(I, 2)
    data = load_official(official_dir(tmp_path / "h", features={"feat_v.npy": feature}))
    assert data.features["v"].dtype == torch.float32
    assert torch.equal(data.features["v"], torch.from_numpy(feature.astype(np.float32)))


def test_redundant_dict_checked_not_trusted(tmp_path):
    root = official_dir(tmp_path / "d")
    good = {}
    for user, item in TRAIN:
        good.setdefault(user, set()).add(item + U)
    np.save(root / "user_item_dict.npy", np.array(good, dtype=object), allow_pickle=True)
    assert "user_item_dict.npy" in load_official(root).card.checksums
    good[0].add(5 + U)
    np.save(root / "user_item_dict.npy", np.array(good, dtype=object), allow_pickle=True)
    expect_error(root, "user_item_dict.npy", "disagrees with the training pairs on 1 pairs")


def test_two_files_for_one_modality(tmp_path):
    features = {"feat_v.pt": torch.ones(I, 2), "FeatureVideo_normal.npy": np.ones((I, 2), np.float32)}
    expect_error(official_dir(tmp_path / "two", features=features), "feat_v.pt", "second feature file for modality v")


def test_word_id_text_out_of_range(tmp_path):
    words = torch.tensor([[0, 9], [1, 2]])  # item row 9 with 6 items
    expect_error(official_dir(tmp_path / "w", features={"feat_t.pt": words, "feat_v.pt": torch.ones(I, 2)}),
                 "feat_t.pt", "names item row 9", "0..5")


def test_malicious_pickle_in_a_dataset_directory(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    root = official_dir(tmp_path / "evil")
    rows = np.empty(1, dtype=object)
    rows[0] = Evil()
    np.save(root / "test_full.npy", rows, allow_pickle=True)
    expect_error(root, "test_full.npy", "refused to unpickle global", "system")
    assert not marker.exists()


# ---- MMRec layout -------------------------------------------------------------------------------------------


def _inter(root, text, name="data"):
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.inter").write_text(text)
    return root


def _mmrec_error(root, *fragments):
    before = _snapshot(root.parent)
    with pytest.raises(DatasetError) as error:
        load_dataset(str(root), format="mmrec")
    for fragment in fragments:
        assert fragment in str(error.value)
    assert _snapshot(root.parent) == before


def test_mmrec_bad_inputs(tmp_path):
    header = "userID\titemID\tx_label\n"
    (tmp_path / "none").mkdir()
    _mmrec_error(tmp_path / "none", ".inter", "missing required file")
    _mmrec_error(_inter(tmp_path / "col", "user\titemID\tx_label\n0\t1\t0\n"), "data.inter", "no userID column")
    _mmrec_error(_inter(tmp_path / "nan", header + "0\t1\t0\n1\t\t0\n"), "data.inter", "column itemID",
                 "non-integer or missing")
    _mmrec_error(_inter(tmp_path / "lab", header + "0\t1\t0\n1\t2\t5\n"), "data.inter", "x_label 5 in data row 2")
    _mmrec_error(_inter(tmp_path / "neg", header + "0\t1\t0\n-1\t2\t0\n"), "data.inter", "negative id in data row 2")
    _mmrec_error(_inter(tmp_path / "empty", header), "data.inter", "training split is empty")
    rows = _inter(tmp_path / "rows", header + "0\t1\t0\n1\t4\t0\n")
    np.save(rows / "image_feat.npy", np.ones((3, 2), np.float32))  # I = 1 + max itemID = 5
    _mmrec_error(rows, "image_feat.npy", "feature row count 3")
    two = _inter(tmp_path / "two", header + "0\t1\t0\n")
    (two / "other.inter").write_text(header)
    _mmrec_error(two, "several .inter files")


def test_mmrec_items_from_features_and_extra_columns(tmp_path):
    root = _inter(tmp_path / "ok", "userID\titemID\trating\tx_label\n0\t1\t5\t0\n1\t0\t1\t0\n0\t0\t1\t1\n1\t1\t1\t2\n")
    np.save(root / "audio_feat.npy", np.ones((4, 2), np.float16))
    data = load_dataset(str(root))
    assert (data.num_users, data.num_items) == (2, 4)  # feature rows beyond the last interacted item
    assert data.features["a"].dtype == torch.float32
    assert data.card.split_counts == {"train": 2, "val": 1, "test": 1}


def test_validate_rejects_mismatched_noise_labels():
    pairs = np.asarray(TRAIN)
    with pytest.raises(DatasetError, match="2 noise labels for 6 pairs"):
        validate(name="x", source_format="synthetic", path=None, num_users=U, num_items=I,
                 splits={"train": pairs, "val": pairs[:0], "test": pairs[:0]}, sources={},
                 train_noise=np.zeros(2, bool))


def test_mmrec_table_is_read_with_pandas(tmp_path):
    """A header-only file with the right columns is readable: the error is about content, not parsing."""
    root = tmp_path / "p"
    root.mkdir()
    pd.DataFrame({"userID": [0, 1], "itemID": [0, 0], "x_label": [0, 0]}).to_csv(root / "t.inter", sep="\t",
                                                                                 index=False)
    assert load_dataset(str(root)).card.split_counts["train"] == 2
