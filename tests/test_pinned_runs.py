"""Pinned metrics of small end-to-end runs (trainer, models, evaluator): changes to the speed machinery must not move
them.

The pinned values were recorded with the implementation before any optimisation (GRCN through PyG gather/scatter,
scores through ``torch.mm``, ranking through ``torch.topk``), then re-recorded where a change to the ops' order of
summation moved them by float round-off (each such change is in the history of this file with its size). Rank
metrics come from integer hit counts, so they must match exactly; losses may move by float round-off only. If a
deliberate change to the generator, the trainer or a model moves them, re-record them and say why in the commit.
"""

from __future__ import annotations

import pytest

from grcn_bench.benchmarks.config import TrainSettings
from grcn_bench.benchmarks.evaluator import evaluate
from grcn_bench.benchmarks.trainer import fit, seed_everything
from grcn_bench.datasets import load_dataset
from grcn_bench.models import get_model

# ------------------------------------------------------------------------------------------------- pinned metrics

PINNED = {
    ("mf", "synthetic:tiny", ()): {
        "loss": [0.6945679287115732, 0.6358870267868042, 0.5898929536342621],
        "best": 3,
        "val": [
            (0.1747222222222222, 0.1105860812522133, 0.2486111111111111),
            (0.18305555555555558, 0.10794265070706956, 0.3180555555555556),
            (0.18861111111111112, 0.11837236798408773, 0.3022222222222222),
        ],
        "test": {"precision@10": 0.016666666666666666, "recall@10": 0.10138888888888889,
                 "ndcg@10": 0.055371972170137305, "precision@20": 0.020833333333333336,
                 "recall@20": 0.2494444444444444, "ndcg@20": 0.09873852984079233},
    },
    ("grcn", "synthetic:tiny", ()): {
        "loss": [0.5973418653011322, 0.5005835344394048, 0.4431523581345876],
        "best": 2,
        "val": [
            (0.24083333333333332, 0.16426481605376012, 0.35583333333333333),
            (0.2797222222222222, 0.17037041203525147, 0.34694444444444444),
            (0.23805555555555555, 0.16379852866305916, 0.41083333333333333),
        ],
        "test": {"precision@10": 0.04166666666666667, "recall@10": 0.2663888888888889,
                 "ndcg@10": 0.14139090202996715, "precision@20": 0.03333333333333333,
                 "recall@20": 0.4336111111111111, "ndcg@20": 0.1889103530045245},
    },
    # The release variant as it was when these were recorded (hard pruning, the shared L2 term), spelt out.
    ("grcn", "synthetic:tiny", (("variant", "official"), ("pruning", "hard"), ("l2_weighting", "shared"))): {
        "loss": [0.5013461410999298, 0.3765921692053477, 0.31218385696411133],
        "best": 1,
        "val": [
            (0.24694444444444444, 0.14245389765832606, 0.3975),
            (0.22972222222222222, 0.14041107848697906, 0.36638888888888893),
            (0.23805555555555555, 0.15168363214823016, 0.34750000000000003),
        ],
        "test": {"precision@10": 0.04166666666666667, "recall@10": 0.29083333333333333,
                 "ndcg@10": 0.12460304375964663, "precision@20": 0.03666666666666665,
                 "recall@20": 0.4663888888888889, "ndcg@20": 0.17540081545480238},
    },
    ("grcn", "synthetic:tiny?text=words", (("fusion", "mean"),)): {
        "loss": [0.49162350594997406, 0.3356764614582062, 0.2545902381340663],
        "best": 1,
        "val": [
            (0.29583333333333334, 0.16918646136359258, 0.3977777777777778),
            (0.2663888888888889, 0.14809921019389194, 0.39722222222222225),
            (0.2472222222222222, 0.16499973869509416, 0.4041666666666667),
        ],
        "test": {"precision@10": 0.04500000000000001, "recall@10": 0.26694444444444443,
                 "ndcg@10": 0.16627658303016488, "precision@20": 0.04083333333333332,
                 "recall@20": 0.4852777777777778, "ndcg@20": 0.22733232560974234},
    },
}


def _pinned_cases():
    # The first two run by default; the release variant and word-id text (about 10 s each) with -m slow.
    for index, key in enumerate(PINNED):
        marks = () if index < 2 else (pytest.mark.slow,)
        yield pytest.param(key, marks=marks, id=f"{key[0]}-{key[1]}-{dict(key[2])}")


@pytest.mark.parametrize("key", list(_pinned_cases()))
def test_small_runs_reproduce_the_metrics_recorded_before_optimisation(key):
    name, spec, options = key
    expected = PINNED[key]
    dataset = load_dataset(spec)
    settings = TrainSettings(lr=0.01, reg_weight=1e-3, seed=0, batch_size=128, max_epochs=3)
    seed_everything(0)
    model = get_model(name)(dataset.info(), **dict(options))
    result = fit(model, dataset, settings, lambda m, e: evaluate(m, dataset, "val", ks=(10, 20)).mean(),
                 progress=False)
    test = evaluate(model, dataset, "test", ks=(10, 20)).mean()
    assert [r.loss for r in result.history] == pytest.approx(expected["loss"], rel=1e-5)
    observed = [(r.metrics["recall@10"], r.metrics["ndcg@10"], r.metrics["recall@20"]) for r in result.history]
    assert observed == expected["val"]
    assert result.best_epoch == expected["best"]
    assert test == expected["test"]
