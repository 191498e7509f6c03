"""The MMRec layout (docs/protocol.md, "Formats"): the real Tiktok subset, round trips, and unsplit tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from grcn_bench.datasets import generate_synthetic, load_dataset, write_mmrec
from grcn_bench.datasets.mmrec import load_mmrec


def test_tiktok_mmrec(shared_dataset):
    root = shared_dataset("tiktok_mmrec")
    data = load_dataset(str(root))
    assert data.card.source_format == "mmrec" and data.name == "tiktok"
    assert (data.num_users, data.num_items) == (9_308, 6_710)
    assert data.card.split_counts == {"train": 59_541, "val": 3_051, "test": 6_130}
    assert data.card.modalities == {"v": 128, "a": 128}
    assert data.features["v"].dtype == torch.float32 and data.features["v"].shape == (6_710, 128)
    assert data.card.users_without_train == 9_308 - 9_298  # the README: 9,298 users have a train interaction
    # An independent reading of the table: pandas straight to sorted pairs per x_label.
    table = pd.read_csv(root / "tiktok.inter", sep="\t")
    for code, split in enumerate(("train", "val", "test")):
        rows = table[table.x_label == code][["userID", "itemID"]].to_numpy()
        rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
        assert np.array_equal(data.split(split).numpy(), rows)
    image = np.load(root / "image_feat.npy", allow_pickle=False)
    assert torch.equal(data.features["v"], torch.from_numpy(image.astype(np.float32)))
    # The same interactions as the derived npz of the DiffMM copy.
    npz_path = root.parent / "tiktok_diffmm" / "interactions.npz"
    if npz_path.is_file():
        with np.load(npz_path, allow_pickle=False) as npz:
            test = np.stack([npz["test_user"], npz["test_item"]], 1).astype(np.int64)
        assert np.array_equal(data.test.numpy(), test[np.lexsort((test[:, 1], test[:, 0]))])


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("tiktok", {"users": 80, "items": 150,
                                                                          "interactions": 900})])
def test_round_trip(tmp_path, preset, overrides):
    data = generate_synthetic(preset, **overrides)
    write_mmrec(data, tmp_path, "synth")
    assert (tmp_path / "synth.inter").read_text().splitlines()[0] == "userID\titemID\tx_label"
    loaded = load_mmrec(tmp_path)
    assert loaded.name == "synth"
    assert (loaded.num_users, loaded.num_items) == (data.num_users, data.num_items)
    for split in ("train", "val", "test"):
        assert torch.equal(loaded.split(split), data.split(split))
    assert loaded.features.keys() == data.features.keys()
    for m, x in data.features.items():
        assert torch.equal(loaded.features[m], x)


def test_word_ids_cannot_be_written():
    with pytest.raises(ValueError, match="no word-id text"):
        write_mmrec(generate_synthetic("tiny", text="words"), "/nonexistent/never-written", "x")


def test_unsplit_table_is_split(tmp_path):
    users = np.repeat(np.arange(4), [10, 10, 2, 20])
    items = np.concatenate([np.arange(10), np.arange(10), [0, 1], np.arange(20)])
    pd.DataFrame({"userID": users, "itemID": items}).to_csv(tmp_path / "raw.inter", sep="\t", index=False)
    data = load_dataset(str(tmp_path), split_seed=2)
    assert data.card.split_seed == 2
    counts = {split: np.bincount(data.split(split)[:, 0].numpy(), minlength=4).tolist()
              for split in ("train", "val", "test")}
    assert counts == {"train": [8, 8, 2, 16], "val": [1, 1, 0, 2], "test": [1, 1, 0, 2]}


def test_named_inter_file(tmp_path):
    for name, n in (("a", 3), ("b", 5)):
        pd.DataFrame({"userID": np.zeros(n, int), "itemID": np.arange(n), "x_label": np.zeros(n, int)}).to_csv(
            tmp_path / f"{name}.inter", sep="\t", index=False)
    assert load_mmrec(tmp_path, name="b").card.split_counts["train"] == 5
