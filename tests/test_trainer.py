"""The trainer (docs/protocol.md, "Training"): early stopping, best-state restore, test once, divergence,
determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grcn_bench.benchmarks import runner
from grcn_bench.benchmarks.config import Cell, TrainSettings
from grcn_bench.benchmarks.executors import run_grid
from grcn_bench.benchmarks.runner import run_cell
from grcn_bench.benchmarks.store import ResultStore
from grcn_bench.benchmarks.trainer import epoch_triplets, fit, load_checkpoint
from grcn_bench.datasets import load_dataset
from grcn_bench.models import register_model, unregister_model
from grcn_bench.models.mf import MF


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic:tiny")


def test_stops_patience_epochs_after_the_best_and_restores_the_best_state(tiny, tmp_path):
    curve = [0.10, 0.20, 0.35, 0.30, 0.34, 0.33, 0.35, 0.99]  # best at epoch 3; ties do not count as better
    snapshots = {}

    def scripted(model, epoch):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"recall@10": curve[epoch - 1]}

    torch.manual_seed(0)
    model = MF(tiny.info())
    settings = TrainSettings(lr=0.05, patience=4, max_epochs=50)
    result = fit(model, tiny, settings, scripted, checkpoint_path=tmp_path / "best.pt", progress=False)
    assert result.status == "ok" and result.best_epoch == 3
    assert result.epochs_run == 3 + 4 and "early stop" in result.stop_reason
    # The training moved the parameters after epoch 3, and the restored state is epoch 3's, bit for bit.
    assert not torch.equal(snapshots[7]["user_embedding"], snapshots[3]["user_embedding"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[3][name]), name
    for name, value in load_checkpoint(tmp_path / "best.pt").items():
        assert torch.equal(value, snapshots[3][name]), name


def test_max_epochs_bounds_training(tiny):
    model = MF(tiny.info())
    result = fit(model, tiny, TrainSettings(max_epochs=3), lambda m, e: {"recall@10": e / 10}, progress=False)
    assert result.epochs_run == 3 and result.best_epoch == 3 and "max_epochs" in result.stop_reason


def test_each_epoch_uses_every_pair_once_with_fresh_valid_negatives(tiny):
    indptr, items = tiny.user_items("train")
    generator = torch.Generator().manual_seed(0)
    first = epoch_triplets(tiny.train, indptr, items, tiny.num_items, generator)
    second = epoch_triplets(tiny.train, indptr, items, tiny.num_items, generator)
    for users, pos, neg in (first, second):
        pairs = sorted(zip(users.tolist(), pos.tolist(), strict=True))
        assert pairs == sorted(map(tuple, tiny.train.tolist()))
        train_set = set(map(tuple, tiny.train.tolist()))
        assert not any((u, j) in train_set for u, j in zip(users.tolist(), neg.tolist(), strict=True))
    assert not torch.equal(first[0], second[0])  # reshuffled


def test_test_split_is_evaluated_once_with_the_best_state(tiny, tmp_path, monkeypatch):
    calls = []
    real = runner.evaluate

    def counting(model, dataset, split, **kwargs):
        calls.append(split)
        return real(model, dataset, split, **kwargs)

    monkeypatch.setattr(runner, "evaluate", counting)
    cell = Cell("mf", "synthetic:tiny", TrainSettings(lr=0.01, max_epochs=6, patience=3))
    result = run_cell(cell, ResultStore(tmp_path), progress=False)
    assert result["status"] == "ok"
    assert calls.count("test") == 1 and calls[-1] == "test"
    assert calls.count("val") == result["epochs_run"]
    assert result["val_metrics"]["recall@10"] == max(h["metrics"]["recall@10"] for h in result["history"])


class _Exploding(MF):
    """MF whose loss becomes NaN from the third batch on."""

    def __init__(self, data, **kwargs):
        super().__init__(data, **kwargs)
        self.batches = 0

    def loss(self, emb, users, pos, neg, reg_weight):
        self.batches += 1
        value = super().loss(emb, users, pos, neg, reg_weight)
        return value * math.nan if self.batches >= 3 else value


class _Broken(MF):
    def forward(self, graph):
        raise RuntimeError("model exploded on purpose")


@pytest.fixture
def throwaway_models():
    register_model("test_exploding")(_Exploding)
    register_model("test_broken")(_Broken)
    yield
    unregister_model("test_exploding")
    unregister_model("test_broken")


def test_nan_loss_is_diverged_failures_are_stored_and_the_grid_goes_on(tmp_path, throwaway_models):
    settings = TrainSettings(lr=0.01, max_epochs=3, batch_size=64)
    cells = [Cell("test_exploding", "synthetic:tiny", settings), Cell("test_broken", "synthetic:tiny", settings),
             Cell("mf", "synthetic:tiny", settings)]
    store = ResultStore(tmp_path)
    results = run_grid(cells, store, progress=False)
    assert [r["status"] for r in results] == ["diverged", "failed", "ok"]
    assert "non-finite" in results[0]["stop_reason"]
    assert "model exploded on purpose" in results[1]["error"] and "Traceback" in results[1]["traceback"]
    assert all(store.has(c.cell_id) for c in cells)


def test_same_seed_gives_bit_identical_metrics(tmp_path):
    cell = Cell("mf", "synthetic:tiny", TrainSettings(lr=0.01, max_epochs=4, seed=3))
    first = run_cell(cell, ResultStore(tmp_path / "a"), progress=False)
    second = run_cell(cell, ResultStore(tmp_path / "b"), progress=False)
    assert first["history"][-1]["loss"] == second["history"][-1]["loss"]
    assert [h["metrics"] for h in first["history"]] == [h["metrics"] for h in second["history"]]
    assert first["test_metrics"] == second["test_metrics"]
    other = run_cell(Cell("mf", "synthetic:tiny", TrainSettings(lr=0.01, max_epochs=4, seed=4)),
                     ResultStore(tmp_path / "c"), progress=False)
    assert other["history"][0]["loss"] != first["history"][0]["loss"]


def test_mf_beats_popularity_on_tiny(tmp_path):
    from grcn_bench.benchmarks.reference import popularity_result

    # tiny's 60 users and 16 taste clusters leave about 3 users per cluster: too few to learn from. With 4 clusters
    # the preferences are learnable at this size, and BPR-MF must then beat the popularity ranking.
    spec = "synthetic:tiny?clusters=4"
    cell = Cell("mf", spec, TrainSettings(lr=0.01, reg_weight=1e-4, max_epochs=100, patience=20))
    result = run_cell(cell, ResultStore(tmp_path), progress=False)
    popularity = popularity_result(load_dataset(spec), "test").mean()["recall@10"]
    assert result["status"] == "ok"
    assert result["test_metrics"]["recall@10"] > popularity + 0.05


def test_train_epoch_reports_every_batch():
    from grcn_bench.benchmarks.trainer import seed_everything, train_epoch

    dataset = load_dataset("synthetic:tiny")
    generator = seed_everything(0)
    model = MF(dataset.info(), embedding_dim=8)
    indptr, items = dataset.user_items("train")
    users, pos, neg = epoch_triplets(dataset.train, indptr, items, dataset.num_items, generator)
    settings = TrainSettings(batch_size=100)
    calls = []
    loss = train_epoch(model, dataset.graph(), users, pos, neg, settings, torch.optim.Adam(model.parameters()),
                       torch.device("cpu"), on_batch=lambda: calls.append(1))
    assert math.isfinite(loss) and len(calls) == math.ceil(users.numel() / 100) > 1


@pytest.mark.parametrize("curve, patience, max_epochs", [
    ([0.10, 0.20, 0.35, 0.30, 0.34, 0.33, 0.35, 0.99], 4, 50),  # ties do not count as better
    ([0.1, 0.2, 0.3, 0.4], 2, 4),  # still improving at max_epochs
    ([0.3, float("nan"), 0.2, 0.1], 2, 10),  # a NaN never improves
    ([0.1, 0.2, 0.1, 0.1], 2, 4),  # the stop and max_epochs in the same epoch: the stop's reason
])
def test_replaying_the_stopping_rule_on_a_curve_stops_where_fit_stops(tiny, curve, patience, max_epochs):
    from grcn_bench.benchmarks.trainer import replay_stopping

    settings = TrainSettings(lr=0.05, patience=patience, max_epochs=max_epochs)
    fitted = fit(MF(tiny.info()), tiny, settings, lambda m, e: {"recall@10": curve[e - 1]}, progress=False)
    replay = replay_stopping(curve, patience, max_epochs)
    assert (replay.best_epoch, replay.epochs_run, replay.stop_reason) == \
        (fitted.best_epoch, fitted.epochs_run, fitted.stop_reason)
    assert replay_stopping(curve[: fitted.epochs_run - 1], patience, max_epochs) is None  # one epoch short


def test_the_audit_track_follows_the_released_run_and_never_steers_the_standard_one(tiny):
    from grcn_bench.benchmarks.trainer import AuditTrack

    val = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    official = [0.5, 0.4, 0.3, 0.2, 0.9, 0.1]  # the released run would stop after epoch 3 (patience 2)
    captured = []

    def evaluate(model, epoch):
        return {"recall@10": official[epoch - 1]}, {"test_users": np.array([epoch])}

    def capture(model, epoch):
        captured.append(epoch)
        return {"val_metrics": {"recall@10": -epoch}}

    settings = TrainSettings(lr=0.05, patience=2, max_epochs=6)
    track = AuditTrack(evaluate, capture, settings.patience, settings.max_epochs)
    with_track = fit(MF(tiny.info()), tiny, settings, lambda m, e: {"recall@10": val[e - 1]}, progress=False,
                     audit=track)
    assert with_track.best_epoch == 6 and with_track.epochs_run == 6  # the standard run's own curve decides
    record = track.record()
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3] and record["stopped"]  # nothing after its stop
    assert [e["loss"] for e in record["epochs"]] == [h.loss for h in with_track.history[:3]]
    assert captured == [1] and record["best"]["epoch"] == 1 and track.arrays["test_users"].tolist() == [1]

    def failing(model, epoch):
        if epoch == 2:
            raise ValueError("NaN scores")
        return evaluate(model, epoch)

    broken = AuditTrack(failing, None, settings.patience, settings.max_epochs)
    result = fit(MF(tiny.info()), tiny, settings, lambda m, e: {"recall@10": val[e - 1]}, progress=False,
                 audit=broken)
    assert result.status == "ok" and result.epochs_run == 6
    assert [e["epoch"] for e in broken.record()["epochs"]] == [1] and "NaN scores" in broken.record()["error"]
