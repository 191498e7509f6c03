"""``models.losses`` and ``Recommender.loss``: BPR plus the ego-L2 term, computed through the one-buffer pair scores
(``ops.bpr_pair_scores``), against the plain two-gather formula."""

from __future__ import annotations

import pytest
import torch

from grcn_bench.datasets import load_dataset
from grcn_bench.models.base import Embeddings
from grcn_bench.models.mf import MF


def _loss_gradients(computed: bool, plain: bool) -> list[torch.Tensor]:
    """Every parameter's gradient of BPR-MF's batch loss on the tiny preset: ``Recommender.loss`` or the plain
    two-gather formula; with ``computed``, of outputs computed from the parameters (as every graph model's are)."""
    from grcn_bench.models.losses import bpr_loss, ego_l2

    dataset = load_dataset("synthetic:tiny")
    users = torch.tensor([0, 3, 3, 1, 3, 2])  # repeated users and items: the order of the sums matters
    pos, neg = torch.tensor([4, 4, 1, 0, 2, 4]), torch.tensor([1, 6, 1, 6, 3, 6])
    torch.manual_seed(0)
    model = MF(dataset.info(), embedding_dim=8)
    emb = model(dataset.graph())
    if computed:
        emb = Embeddings(emb.user * 1.5, emb.item * 1.5)
    if plain:
        scores = (model.pair_score(emb, users, pos), model.pair_score(emb, users, neg))
        loss = bpr_loss(*scores) + 0.1 * ego_l2(model.ego_parameters(users, pos, neg))
    else:
        loss = model.loss(emb, users, pos, neg, 0.1)
    return list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("computed", [True, False], ids=["computed-outputs", "parameter-outputs"])
def test_the_loss_has_the_two_gather_gradients(computed):
    """``Recommender.loss`` (one code path: the one-buffer pair scores) against the plain two-call loss. For computed
    outputs the op sums each row's terms as two gathers would, to the bit. Where the outputs are the parameters
    themselves (BPR-MF) autograd adds the regulariser's gradient at another point of the sum: within float32
    round-off (measured: at most 4e-9 apart, on gradients up to 0.06)."""
    fused, plain = _loss_gradients(computed, plain=False), _loss_gradients(computed, plain=True)
    for got, want in zip(fused, plain, strict=True):
        if computed:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert any(bool(g.abs().sum() > 0) for g in fused)


@pytest.mark.parametrize("computed", [True, False], ids=["computed-outputs", "parameter-outputs"])
def test_the_loss_gradients_are_deterministic(computed):
    first, second = _loss_gradients(computed, plain=False), _loss_gradients(computed, plain=False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
