"""Precision / Recall / NDCG @K per user (docs/protocol.md, "Metrics") and the released code's NDCG.

Hand-computed cases write the arithmetic out; a randomised comparison checks the vectorised code against
``torch_geometric.metrics.LinkPred*``. PyG's (unweighted) NDCG uses ``IDCG = sum_{r < min(|P|, K)} 1/log2(r+2)``,
the same as docs/protocol.md, "Metrics", and averages over rows with at least one label, as the evaluator does by
skipping users without held-out positives. PyG computes in float32, hence the tolerance of that comparison.
"""

from __future__ import annotations

from math import log2

import pytest
import torch

from grcn_bench.benchmarks.metrics import (
    discounts,
    hits_from_csr,
    hits_from_mask,
    metric_names,
    normalize_ks,
    pad_hits,
    rank_metrics,
    top_k,
    topk_hits,
)

T, F = True, False


def as_hits(rows: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def assert_values(out: dict[str, torch.Tensor], name: str, expected: list[float]) -> None:
    assert out[name].dtype == torch.float64
    torch.testing.assert_close(out[name], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# Four users ranked to depth 3:
#   A: |P| = 5 > K, hits at ranks 0 and 2    B: |P| = 1 < K, hit at rank 1
#   C: |P| = 2, no hit                       D: |P| = 3, all hits
HITS = as_hits([[T, F, T], [F, T, F], [F, F, F], [T, T, T]])
NUM_POS = torch.tensor([5, 1, 2, 3])
D0, D1, D2 = 1 / log2(2), 1 / log2(3), 1 / log2(4)  # 1.0, 0.6309..., 0.5


def test_hand_computed_at_3():
    out = rank_metrics(HITS, NUM_POS, [3])
    assert list(out) == ["precision@3", "recall@3", "ndcg@3"]
    # precision = hits / K: A 2/3, B 1/3, C 0, D 3/3
    assert_values(out, "precision@3", [2 / 3, 1 / 3, 0.0, 1.0])
    # recall = hits / |P|: A 2/5, B 1/1, C 0/2, D 3/3
    assert_values(out, "recall@3", [2 / 5, 1.0, 0.0, 1.0])
    # A: DCG = D0 + D2 = 1.5; IDCG over min(5, 3) = 3 positions = D0 + D1 + D2 = 2.1309  -> 0.7039
    # B: DCG = D1; IDCG over min(1, 3) = 1 position = D0 = 1                                -> 0.6309
    # C: DCG = 0 -> 0.   D: DCG = IDCG = D0 + D1 + D2                                        -> 1
    assert_values(out, "ndcg@3", [(D0 + D2) / (D0 + D1 + D2), D1 / D0, 0.0, 1.0])
    assert out["ndcg@3"][0].item() == pytest.approx(0.703918, abs=1e-6)


def test_several_ks_at_once():
    out = rank_metrics(HITS, NUM_POS, (3, 1, 2))
    assert list(out) == metric_names((1, 2, 3))
    # @1: only rank 0 counts. A hit (1/1, 1/5, NDCG 1), B miss, C miss, D hit (1, 1/3, 1)
    assert_values(out, "precision@1", [1.0, 0.0, 0.0, 1.0])
    assert_values(out, "recall@1", [1 / 5, 0.0, 0.0, 1 / 3])
    assert_values(out, "ndcg@1", [1.0, 0.0, 0.0, 1.0])
    # @2: A 1 hit (rank 0), IDCG over min(5, 2) = 2 -> 1 / (D0 + D1); B hit at rank 1, IDCG = D0 -> D1;
    # D 2 hits, IDCG over min(3, 2) = 2 -> 1
    assert_values(out, "precision@2", [1 / 2, 1 / 2, 0.0, 1.0])
    assert_values(out, "recall@2", [1 / 5, 1.0, 0.0, 2 / 3])
    assert_values(out, "ndcg@2", [D0 / (D0 + D1), D1, 0.0, 1.0])
    # @3 is the same as computed alone: K values do not interact.
    alone = rank_metrics(HITS, NUM_POS, [3])
    for name, value in alone.items():
        assert torch.equal(out[name], value)


def test_official_ndcg_differs_from_standard():
    # |P| = 2, one hit at rank 0, K = 3.
    hits, num_pos = as_hits([[T, F, F], [F, T, F], [F, F, F], [T, F, T]]), torch.tensor([2, 4, 1, 3])
    standard = rank_metrics(hits, num_pos, [3], ndcg="standard")
    official = rank_metrics(hits, num_pos, [3], ndcg="official")
    # Row 0: standard IDCG over min(|P|=2, 3) = 2 positions: 1 / (1 + 0.6309) = 0.6131;
    #        official IDCG over min(hits=1, 3) = 1 position: 1 / 1 = 1.0 (a single hit at the top is "perfect").
    # Row 1: one hit at rank 1: standard D1 / (D0 + D1 + D2) = 0.2961; official D1 / D0 = 0.6309.
    # Row 2: no hit: both 0 (official IDCG over 0 positions is 0 and the value is defined as 0).
    # Row 3: hits at ranks 0, 2, |P| = 3: standard (D0 + D2) / (D0 + D1 + D2); official (D0 + D2) / (D0 + D1).
    assert_values(standard, "ndcg@3", [D0 / (D0 + D1), D1 / (D0 + D1 + D2), 0.0, (D0 + D2) / (D0 + D1 + D2)])
    assert_values(official, "ndcg@3", [1.0, D1, 0.0, (D0 + D2) / (D0 + D1)])
    assert standard["ndcg@3"][0].item() == pytest.approx(0.613147, abs=1e-6)
    # Precision and recall do not depend on the NDCG variant.
    for name in ("precision@3", "recall@3"):
        assert torch.equal(standard[name], official[name])


def test_rows_without_positives_score_zero():
    out = rank_metrics(as_hits([[F, F]]), torch.tensor([0]), [2])
    assert all(value.item() == 0.0 for value in out.values())


def test_discounts():
    torch.testing.assert_close(discounts(3), torch.tensor([D0, D1, D2], dtype=torch.float64))


def test_metric_names_and_ks():
    assert normalize_ks(10) == (10,)
    assert normalize_ks([20, 10, 20, 5]) == (5, 10, 20)
    assert metric_names([20, 10]) == [
        "precision@10", "recall@10", "ndcg@10", "precision@20", "recall@20", "ndcg@20"
    ]  # fmt: skip
    assert metric_names(10, metrics=("ndcg", "recall")) == ["recall@10", "ndcg@10"]


@pytest.mark.parametrize("ks", [(), [0], [-5], [True], [2.5], ["10"]])
def test_bad_ks(ks):
    with pytest.raises(ValueError, match="ks is empty|positive int"):
        normalize_ks(ks)


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="unknown metric"):
        metric_names(10, metrics=("map",))


def test_rank_metrics_errors():
    with pytest.raises(ValueError, match="unknown ndcg variant"):
        rank_metrics(HITS, NUM_POS, [3], ndcg="grcn")
    with pytest.raises(ValueError, match="bool"):
        rank_metrics(HITS.float(), NUM_POS, [3])
    with pytest.raises(ValueError, match="bool"):
        rank_metrics(HITS[0], NUM_POS, [3])
    with pytest.raises(ValueError, match="exceeds"):
        rank_metrics(HITS, NUM_POS, [4])
    with pytest.raises(ValueError, match="num_positives must have shape"):
        rank_metrics(HITS, NUM_POS[:3], [3])
    with pytest.raises(ValueError, match="more hits than positives"):
        rank_metrics(as_hits([[T, T]]), torch.tensor([1]), [2])


def test_top_k_order_and_errors():
    scores = torch.tensor([[0.1, 0.9, -0.3, 0.5], [2.0, -1.0, 0.0, 1.0]])
    values, items = top_k(scores, 3)
    assert items.tolist() == [[1, 3, 0], [0, 3, 2]]
    torch.testing.assert_close(values, torch.tensor([[0.9, 0.5, 0.1], [2.0, 1.0, 0.0]]))
    # A catalogue smaller than k returns every item.
    assert top_k(scores, 10)[1].shape == (2, 4)
    with pytest.raises(ValueError, match=r"\[B, I\] matrix"):
        top_k(scores[0], 2)
    with pytest.raises(ValueError, match="k must be positive"):
        top_k(scores, 0)


def test_hits_from_csr_and_mask_agree():
    top = torch.tensor([[4, 0, 2], [1, 3, 4], [0, 1, 2]])
    # Row 0 positives {2, 4}, row 1 {0}, row 2 {2, 1} given unsorted: the result must not depend on the order.
    indptr, items = torch.tensor([0, 2, 3, 5]), torch.tensor([4, 2, 0, 2, 1])
    expected = [[T, F, T], [F, F, F], [F, T, T]]
    assert hits_from_csr(top, indptr, items, num_items=5).tolist() == expected
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[torch.tensor([0, 0, 1, 2, 2]), items] = True
    assert hits_from_mask(top, mask).tolist() == expected
    # No positives at all in the batch.
    assert not hits_from_csr(top, torch.zeros(4, dtype=torch.long), torch.empty(0, dtype=torch.long), 5).any()


def test_hits_errors():
    top = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="indptr has 3 entries for 1 rows"):
        hits_from_csr(top, torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="positive_mask must be a bool"):
        hits_from_mask(top, torch.ones(1, 3))
    with pytest.raises(ValueError, match="positive_mask must be a bool"):
        hits_from_mask(top, torch.ones(2, 3, dtype=torch.bool))


def test_topk_hits_pads_small_catalogue():
    scores = torch.tensor([[0.3, 0.1, 0.2]])
    hits, num_pos = topk_hits(scores, (torch.tensor([0, 2]), torch.tensor([1, 2])), kmax=5)
    # Ranking 0, 2, 1: hits at ranks 1 and 2, then two empty positions.
    assert hits.tolist() == [[F, T, T, F, F]]
    assert num_pos.tolist() == [2]
    out = rank_metrics(hits, num_pos, [5])
    assert out["precision@5"].item() == pytest.approx(2 / 5)  # an empty position still counts in K
    assert out["recall@5"].item() == 1.0
    assert pad_hits(hits, 3) is hits


def random_case(seed: int, num_rows: int = 40, num_items: int = 60):
    """Distinct random scores (no ties) and random positive sets of sizes 0..25 (some rows with none)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randperm(num_rows * num_items, generator=gen).view(num_rows, num_items).double()
    sizes = torch.randint(0, 26, (num_rows,), generator=gen)
    sizes[0] = 0
    rows, items = [], []
    for row, size in enumerate(sizes.tolist()):
        rows += [row] * size
        items += torch.randperm(num_items, generator=gen)[:size].tolist()
    return scores, torch.tensor(rows, dtype=torch.long), torch.tensor(items, dtype=torch.long)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torch_geometric_linkpred(seed):
    from torch_geometric.metrics import LinkPredNDCG, LinkPredPrecision, LinkPredRecall

    scores, rows, items = random_case(seed)
    num_rows = scores.size(0)
    ks = (1, 5, 10, 20)
    indptr = torch.zeros(num_rows + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(rows, minlength=num_rows), 0, out=indptr[1:])
    hits, num_pos = topk_hits(scores, (indptr, items), kmax=max(ks))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[rows, items] = True
    hits_dense, num_pos_dense = topk_hits(scores, mask, kmax=max(ks))
    assert torch.equal(hits, hits_dense) and torch.equal(num_pos, num_pos_dense)
    ours = rank_metrics(hits, num_pos, ks)
    labelled = num_pos > 0

    top = top_k(scores, max(ks))[1]
    label_index = torch.stack([rows, items])
    for k in ks:
        for name, metric_cls in (("precision", LinkPredPrecision), ("recall", LinkPredRecall), ("ndcg", LinkPredNDCG)):
            metric = metric_cls(k)
            metric.update(top[:, :k], label_index)
            expected = metric.compute().item()
            got = ours[f"{name}@{k}"][labelled].mean().item()
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{name}@{k}"
            # Per row too: one row at a time through PyG's public API.
            for row in (1, 7, 23):
                single = metric_cls(k)
                keep = rows == row
                single.update(top[row : row + 1, :k], torch.stack([torch.zeros_like(rows[keep]), items[keep]]))
                assert ours[f"{name}@{k}"][row].item() == pytest.approx(single.compute().item(), rel=1e-5, abs=1e-6)
