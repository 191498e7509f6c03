"""Pinned end-to-end results of the five baselines: a speed-up of a layer must not change what a model computes.

The numbers below were recorded with the straightforward implementation of each baseline (PyG's ``SAGEConv`` and
``GATConv`` forwards on an ``adj_t`` / ``edge_index``, DisenGCN's channel routing through sampled and sparse
products) before the layers were rewritten for speed at Tiktok scale: three epochs on ``synthetic:tiny`` (seed 0,
lr 1e-2, the default λ), through the runner, so that training, validation-based selection and the test evaluation
all take part. Recorded with one and with two torch threads: identical. A faster layer may change float round-off
only: the per-epoch training loss must agree to 1e-5 (relative) and every test metric to 1e-9.
"""

from __future__ import annotations

import pytest

from grcn_bench.benchmarks.config import Cell, TrainSettings
from grcn_bench.benchmarks.runner import run_cell
from grcn_bench.benchmarks.store import ResultStore

# model -> (per-epoch mean training loss, best epoch, test metrics of the best epoch)
PINNED: dict[str, tuple[list[float], int, dict[str, float]]] = {
    "graphsage": (
        [0.6914252638816833, 0.6094592809677124, 0.531438946723938],
        3,
        {
            "precision@10": 0.053333333333333344,
            "recall@10": 0.28888888888888886,
            "ndcg@10": 0.16127831059871417,
            "precision@20": 0.034166666666666665,
            "recall@20": 0.36777777777777776,
            "ndcg@20": 0.18362499311083813,
        },
    ),
    "gat": (
        [0.6856906414031982, 0.6584137678146362, 0.6313802599906921],
        2,
        {
            "precision@10": 0.026666666666666672,
            "recall@10": 0.12583333333333335,
            "ndcg@10": 0.06990279699012034,
            "precision@20": 0.024166666666666666,
            "recall@20": 0.22999999999999998,
            "ndcg@20": 0.10276049275581195,
        },
    ),
    "ngcf": (
        [0.6229469180107117, 0.5457558035850525, 0.47360071539878845],
        1,
        {
            "precision@10": 0.03500000000000001,
            "recall@10": 0.22999999999999998,
            "ndcg@10": 0.15695043835062247,
            "precision@20": 0.03583333333333332,
            "recall@20": 0.4336111111111111,
            "ndcg@20": 0.2164311400894435,
        },
    ),
    "disengcn": (
        [0.599084734916687, 0.5478595495223999, 0.4837879240512848],
        3,
        {
            "precision@10": 0.04333333333333334,
            "recall@10": 0.2513888888888889,
            "ndcg@10": 0.16602666876177838,
            "precision@20": 0.04083333333333332,
            "recall@20": 0.48944444444444446,
            "ndcg@20": 0.23381735107760726,
        },
    ),
    "mmgcn": (
        [0.6966257095336914, 0.6756203174591064, 0.6223261952400208],
        3,
        {
            "precision@10": 0.03500000000000001,
            "recall@10": 0.18055555555555555,
            "ndcg@10": 0.0968079658506389,
            "precision@20": 0.030833333333333334,
            "recall@20": 0.33472222222222225,
            "ndcg@20": 0.14196248015914342,
        },
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


@pytest.mark.parametrize("name", sorted(PINNED))
def test_three_epochs_on_tiny_match_the_pinned_results(name, tmp_path):
    losses, best_epoch, test_metrics = PINNED[name]
    # DisenGCN as pinned: the paper's model, ReLU channels and no item bias (its defaults since, docs/disengcn.md).
    options = {"activation": "relu", "item_bias": False} if name == "disengcn" else {}
    cell = Cell(name, "synthetic:tiny", TrainSettings(max_epochs=3, lr=1e-2), options)
    result = run_cell(cell, ResultStore(tmp_path), progress=False)
    assert result["status"] == "ok", result.get("error")
    assert [record["loss"] for record in result["history"]] == pytest.approx(losses, rel=1e-5, abs=0)
    assert result["best_epoch"] == best_epoch
    assert set(result["test_metrics"]) == set(test_metrics)
    for metric, value in test_metrics.items():
        assert result["test_metrics"][metric] == pytest.approx(value, rel=0, abs=1e-9), metric
