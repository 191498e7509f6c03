"""What the shared λ means for GRCN and for a baseline (``docs/protocol.md``, "Regularisation (λ) means different
things for different models").

GRCN L2-normalises its ID embeddings ``E`` before every use (``e^(0) = normalize(E)``, Eqs. 8-9) and its user
prototypes before routing (``u_(0) = normalize(u_(0)^m)``), so scaling every regularised table by ``c > 0`` leaves
its scores and its BPR loss unchanged and multiplies its L2 term by ``c**2``: λ cannot constrain the embeddings, it
only shrinks their norm, and with it the size of Adam's steps relative to that norm. BPR-MF's scores are the raw
dot products, so the same scaling multiplies them by ``c**2``: there λ constrains what the model can express.

The numbers the test prints are the ones quoted in ``docs/protocol.md``.
"""

from __future__ import annotations

import pytest
import torch

from grcn_bench.datasets import load_dataset
from grcn_bench.models.grcn import GRCN
from grcn_bench.models.losses import bpr_loss
from grcn_bench.models.mf import MF

pytestmark = pytest.mark.usefixtures("one_thread")

C = 4.0  # a power of two: c * x and the norms of c * x are exact in floating point, so GRCN's scores are too
USERS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
POS = torch.tensor([1, 3, 5, 7, 9, 11, 13, 15])
NEG = torch.tensor([2, 4, 6, 8, 10, 12, 14, 16])


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("synthetic:tiny")


def _terms(model, graph) -> tuple[torch.Tensor, float, float]:
    """Scores of the batch's positives, its mean BPR loss and the L2 term that λ multiplies."""
    with torch.no_grad():
        emb = model(graph)
        pos = model.pair_score(emb, USERS, POS)
        neg = model.pair_score(emb, USERS, NEG)
        return pos, float(bpr_loss(pos, neg)), float(model.l2_term(USERS, POS, NEG))


def _scale(parameters, c: float) -> None:
    with torch.no_grad():
        for parameter in parameters:
            parameter.mul_(c)


def test_scaling_grcns_embeddings_changes_only_its_l2_term(tiny):
    graph = tiny.graph()
    torch.manual_seed(0)
    model = GRCN(tiny.info())
    scores, bpr, l2 = _terms(model, graph)
    _scale([model.id_embedding, model.user_prototypes], C)
    scaled_scores, scaled_bpr, scaled_l2 = _terms(model, graph)
    print(f"\nGRCN, E and prototypes x{C:g}: BPR {bpr:.6f} -> {scaled_bpr:.6f}, L2 {l2:.6f} -> {scaled_l2:.6f}")
    assert torch.equal(scaled_scores, scores) and scaled_bpr == bpr
    assert scaled_l2 == pytest.approx(C**2 * l2, rel=1e-6)
    # A scale that is not a power of two: the same, up to rounding.
    _scale([model.id_embedding, model.user_prototypes], 0.3 / C)
    tenth_scores, tenth_bpr, tenth_l2 = _terms(model, graph)
    torch.testing.assert_close(tenth_scores, scores, rtol=1e-5, atol=1e-6)
    assert tenth_bpr == pytest.approx(bpr, rel=1e-6) and tenth_l2 == pytest.approx(0.09 * l2, rel=1e-5)
    # The numbers quoted in docs/protocol.md.
    assert (bpr, l2, scaled_l2) == (pytest.approx(0.737210, abs=2e-6), pytest.approx(0.059178, abs=2e-6),
                                    pytest.approx(0.946855, abs=2e-6))


def test_scaling_grcns_id_table_scales_the_bpr_gradient_by_one_over_c(tiny):
    """The BPR loss is scale-invariant in E, so its gradient at c E is the gradient at E divided by c: with λ
    shrinking E, plain gradient steps grow relative to E. (Adam divides by the gradient's running size, so its steps
    stay near lr whatever the scale; relative to a shrinking E they grow too.)"""
    graph = tiny.graph()
    torch.manual_seed(0)
    model = GRCN(tiny.info())

    def gradient() -> torch.Tensor:
        model.zero_grad()
        emb = model(graph)
        bpr_loss(model.pair_score(emb, USERS, POS), model.pair_score(emb, USERS, NEG)).backward()
        return model.id_embedding.grad.clone()

    before = gradient()
    _scale([model.id_embedding], C)
    after = gradient()
    assert before.abs().sum() > 0
    torch.testing.assert_close(after, before / C, rtol=1e-5, atol=1e-9)


def test_scaling_a_baselines_embeddings_changes_its_scores_and_bpr_loss(tiny):
    graph = tiny.graph()
    torch.manual_seed(0)
    model = MF(tiny.info())
    scores, bpr, l2 = _terms(model, graph)
    _scale([model.user_embedding, model.item_embedding], C)
    scaled_scores, scaled_bpr, scaled_l2 = _terms(model, graph)
    print(f"\nBPR-MF, embeddings x{C:g}: BPR {bpr:.6f} -> {scaled_bpr:.6f}, L2 {l2:.6f} -> {scaled_l2:.6f}")
    torch.testing.assert_close(scaled_scores, C**2 * scores)  # y_ui = e_u . e_i: both factors scale
    assert scaled_bpr != pytest.approx(bpr, rel=1e-3)
    assert scaled_l2 == pytest.approx(C**2 * l2, rel=1e-6)
    # The numbers quoted in docs/protocol.md.
    assert (bpr, scaled_bpr, l2, scaled_l2) == (pytest.approx(0.685073, abs=2e-6), pytest.approx(1.061993, abs=2e-6),
                                                pytest.approx(0.042050, abs=2e-6), pytest.approx(0.672800, abs=2e-6))
