"""The evaluator's fast scoring and ranking paths against the plain ones: ``grouped_top_k`` against ``torch.topk``,
``BufferedDotScores`` against the model's scores, and a whole evaluation at every memory budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grcn_bench.benchmarks.evaluator import BufferedDotScores, evaluate, grouped_top_k
from grcn_bench.datasets import load_dataset
from grcn_bench.models.base import Embeddings
from grcn_bench.models.mf import MF


@pytest.mark.parametrize("k", [1, 10, 20])
@pytest.mark.parametrize("num_items", [4000, 4017])  # whole groups only, and a tail after the last group
def test_grouped_top_k_equals_torch_topk(k, num_items):
    gen = torch.Generator().manual_seed(k)
    scores = torch.randn(37, num_items, generator=gen)  # continuous: no ties, so the lists must be identical
    scores[:, ::5] = float("-inf")
    scores[3, :] = float("-inf")  # a fully masked row
    scores[3, num_items - 1] = 5.0  # ... but for its very last column (in the tail when there is one)
    values, items = grouped_top_k(scores, k)
    expected_values, expected_items = torch.topk(scores, k, dim=1)
    assert torch.equal(values, expected_values)
    finite = torch.isfinite(expected_values)
    assert torch.equal(items[finite], expected_items[finite])
    assert torch.equal(scores.gather(1, items), values)  # -inf positions still point at -inf items


def test_grouped_top_k_nan_first_small_catalogue_and_errors():
    scores = torch.randn(4, 2000)
    scores[2, 1234] = float("nan")
    values, items = grouped_top_k(scores, 5)
    assert torch.isnan(values[2, 0]) and int(items[2, 0]) == 1234
    assert not torch.isnan(values[[0, 1, 3]]).any()
    small = torch.randn(3, 7)
    assert torch.equal(grouped_top_k(small, 10)[0], torch.topk(small, 7, dim=1).values)
    strided = torch.randn(2000, 4).t()  # not row-contiguous: falls back to torch.topk
    assert torch.equal(grouped_top_k(strided, 3)[1], torch.topk(strided, 3, dim=1).indices)
    with pytest.raises(ValueError, match="\\[B, I\\] matrix"):
        grouped_top_k(torch.randn(5), 2)
    with pytest.raises(ValueError, match="k and group must be positive"):
        grouped_top_k(torch.randn(2, 5), 0)


def test_buffered_dot_scores_equal_the_models_scores():
    dataset = load_dataset("synthetic:tiny")
    torch.manual_seed(0)
    model = MF(dataset.info())
    emb = Embeddings(model.user_embedding.detach(), model.item_embedding.detach())
    assert BufferedDotScores.applies(model, emb)
    scorer = BufferedDotScores(emb, max_batch=8)
    users = torch.tensor([5, 0, 59, 5])
    scores, maxima = scorer(users)
    torch.testing.assert_close(scores, model.score(emb, users))
    assert maxima is None
    first, _ = scorer(torch.tensor([1, 2]))
    assert first.shape == (2, dataset.num_items)
    with pytest.raises(ValueError, match="exceed the buffer"):
        scorer(torch.arange(9))
    # Not for a model with its own score, nor for mixed dtypes.
    assert not BufferedDotScores.applies(_OwnScore(dataset.info()), emb)
    assert not BufferedDotScores.applies(model, Embeddings(emb.user.double(), emb.item))


class _OwnScore(MF):
    def score(self, emb, users):
        return super().score(emb, users) * 2.0


def test_fast_evaluation_does_not_depend_on_batch_size_and_reports_phases():
    dataset = load_dataset("synthetic:tiny")
    torch.manual_seed(0)
    model = MF(dataset.info())
    reference = None
    for budget in (1, 7 * dataset.num_items * 8, 1 << 30):
        timings: dict[str, float] = {}
        result = evaluate(model, dataset, "test", ks=(10, 20), memory_budget=budget, timings=timings)
        assert set(timings) == {"forward", "score", "mask", "rank", "metrics"}
        assert all(seconds >= 0 for seconds in timings.values())
        if reference is None:
            reference = result
        for name, values in result.per_user.items():
            np.testing.assert_array_equal(values, reference.per_user[name])
    # The plain path (a model with its own score) ranks identically when its scores are the same.
    plain = _OwnScore(dataset.info())
    plain.load_state_dict(model.state_dict())
    doubled = evaluate(plain, dataset, "test", ks=(10, 20))
    for name, values in doubled.per_user.items():
        np.testing.assert_array_equal(values, reference.per_user[name])
