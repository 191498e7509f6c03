"""A floor for every baseline: trained with a small but sensible budget, each model ranks the test items better than
the popularity ranking (Recall@10), the reference that needs no training.

A model that cannot clear popularity on a preset whose interactions follow user-item affinities as well as item
popularity is broken or crippled by its adaptation, and would flatter GRCN's margin in the tables
(``docs/disengcn.md`` gives the measurements behind DisenGCN's). The fast check trains the seven models on a small
preset; the full-size one (``-m slow``) on the Tiktok-shaped preset with the ``quick`` experiment's budget.
"""

from __future__ import annotations

import pytest
import torch

from grcn_bench.benchmarks.config import TrainSettings
from grcn_bench.benchmarks.evaluator import evaluate
from grcn_bench.benchmarks.reference import popularity_result
from grcn_bench.benchmarks.trainer import fit, seed_everything
from grcn_bench.datasets import load_dataset
from grcn_bench.models import get_model

BASELINES = ["graphsage", "mmgcn", "ngcf", "disengcn", "gat", "grcn", "mf"]

# The small preset: the test preset's two modalities, with enough users that Recall@10 is not a handful of hits.
SMALL = "synthetic:tiny?users=300&items=400&interactions=6000"
SMALL_BUDGET = TrainSettings(lr=1e-2, reg_weight=1e-4, seed=0, max_epochs=20, patience=5)
# The full-size check: the Tiktok-shaped preset under the quick experiment's settings.
FULL = "synthetic:tiktok"
FULL_BUDGET = TrainSettings(lr=1e-2, reg_weight=1e-4, seed=0, max_epochs=40, patience=5)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors run faster on one thread


@pytest.fixture(scope="module")
def datasets():
    """Each preset loaded once, with its popularity Recall@10 on the test split."""
    cache = {}

    def get(spec: str):
        if spec not in cache:
            dataset = load_dataset(spec)
            cache[spec] = dataset, popularity_result(dataset, "test", ks=(10,)).mean()["recall@10"]
        return cache[spec]

    return get


def trained_recall(name: str, dataset, settings: TrainSettings) -> float:
    """Test Recall@10 of ``name`` (default options) trained under ``settings``, selected on validation."""
    graph = dataset.graph()
    seed_everything(settings.seed)
    model = get_model(name)(dataset.info())
    result = fit(model, dataset, settings, lambda m, epoch: evaluate(m, dataset, "val", graph=graph).mean(),
                 graph=graph, progress=False)
    assert result.status == "ok", result.stop_reason
    with torch.no_grad():
        return evaluate(model, dataset, "test", graph=graph).mean()["recall@10"]


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_beats_popularity_on_a_small_preset(name, datasets):
    dataset, popularity = datasets(SMALL)
    recall = trained_recall(name, dataset, SMALL_BUDGET)
    assert recall > popularity, f"{name}: test Recall@10 {recall:.4f} <= popularity {popularity:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_beats_popularity_on_the_tiktok_shaped_preset(name, datasets):
    dataset, popularity = datasets(FULL)
    recall = trained_recall(name, dataset, FULL_BUDGET)
    assert recall > popularity, f"{name}: test Recall@10 {recall:.4f} <= popularity {popularity:.4f}"
