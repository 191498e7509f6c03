"""Speed work must not change results: pinned metrics of small runs, the sparse kernels against plain gather/scatter,
the fast evaluator paths against the plain ones, and the ``perf`` command itself.

The pinned values were recorded with the implementation before any optimisation (GRCN through PyG gather/scatter,
scores through ``torch.mm``, ranking through ``torch.topk``). Rank metrics come from integer hit counts, so they must
match exactly; losses may move by float round-off only. If a deliberate change to the generator, the trainer or a
model moves them, re-record them and say why in the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_geometric.utils import softmax as pyg_softmax

from grcn_bench.benchmarks import perf
from grcn_bench.benchmarks.config import TrainSettings
from grcn_bench.benchmarks.evaluator import BufferedDotScores, evaluate, grouped_top_k
from grcn_bench.benchmarks.trainer import fit, seed_everything
from grcn_bench.datasets import load_dataset
from grcn_bench.datasets.base import DatasetInfo, InteractionGraph
from grcn_bench.models import get_model, register_model, unregister_model
from grcn_bench.models.base import Embeddings, Recommender
from grcn_bench.models.layers import sparse
from grcn_bench.models.layers.field import receptive_field
from grcn_bench.models.layers.native import kernel_status as native_status
from grcn_bench.models.layers.refine import RefinedPropagation, l2_normalize
from grcn_bench.models.layers.sparse import (
    CSRPattern,
    _mkl_product,
    graph_pattern,
    sddmm,
    segment_softmax,
    spmm,
    stack_pattern,
    user_item_pattern,
)
from grcn_bench.models.mf import MF

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


# ------------------------------------------------------------------------------------------------- sparse kernels

PAIRS = torch.tensor([[0, 0], [0, 1], [0, 3], [1, 1], [1, 2], [2, 0], [2, 2], [2, 3], [3, 4]])


def small_graph() -> InteractionGraph:
    # User 4 and item 5 have no edge: empty rows and columns must work.
    return InteractionGraph.from_pairs(PAIRS, 5, 6)


def coo_pattern() -> CSRPattern:
    # Not square in structure: an empty row (1) and an empty column (3).
    return CSRPattern.from_coo(torch.tensor([0, 0, 2, 2, 2, 4]), torch.tensor([0, 2, 0, 1, 4, 2]), 5, 5)


PATTERNS = {
    "graph": lambda: graph_pattern(small_graph()),
    "user_item": lambda: user_item_pattern(small_graph()),
    "coo": coo_pattern,
}


def entries(pattern: CSRPattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every entry, from the row pointer (independent of the kernels)."""
    rowptr = pattern.rowptr.long()
    rows = torch.repeat_interleave(torch.arange(pattern.num_rows), rowptr[1:] - rowptr[:-1])
    return rows, pattern.col.long()


def gather_scatter_spmm(pattern, values, x):
    """One channel ([nnz], [C, d]) or channel-major ([M, nnz], [M, C, d]), by gather and scatter."""
    if values.dim() == 2:
        return torch.stack([gather_scatter_spmm(pattern, v, y) for v, y in zip(values, x, strict=True)])
    rows, cols = entries(pattern)
    messages = values.unsqueeze(-1) * x[cols]
    return torch.zeros(pattern.num_rows, x.size(-1), dtype=x.dtype).index_add(0, rows, messages)


def gather_sddmm(pattern, a, b):
    rows, cols = entries(pattern)
    return (a[..., rows, :] * b[..., cols, :]).sum(-1)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-channel"])
def test_spmm_and_sddmm_match_gather_scatter_in_values_and_gradients(name, channels, stacked, monkeypatch):
    # Small operands run as one product over the channels' stacked pattern, large ones one product per channel.
    monkeypatch.setattr(sparse, "STACK_BELOW_BYTES", 1 << 30 if stacked else 0)
    pattern = PATTERNS[name]()
    gen = torch.Generator().manual_seed(0)
    extra = () if channels is None else (channels,)
    values = torch.randn(*extra, pattern.nnz, generator=gen, requires_grad=True)
    x = torch.randn(*extra, pattern.num_cols, 4, generator=gen, requires_grad=True)
    a = torch.randn(*extra, pattern.num_rows, 4, generator=gen, requires_grad=True)
    for fast, slow, inputs in (
        (lambda v, y: spmm(pattern, v, y), lambda v, y: gather_scatter_spmm(pattern, v, y), (values, x)),
        (lambda p, q: sddmm(pattern, p, q), lambda p, q: gather_sddmm(pattern, p, q), (a, x)),
    ):
        out_fast, out_slow = fast(*inputs), slow(*inputs)
        torch.testing.assert_close(out_fast, out_slow)
        upstream = torch.randn(out_fast.shape, generator=gen)
        grads_fast = torch.autograd.grad(out_fast, inputs, upstream)
        grads_slow = torch.autograd.grad(out_slow, inputs, upstream)
        for got, want in zip(grads_fast, grads_slow, strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("channels", [None, 2])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-channel"])
def test_custom_autograd_functions_pass_gradcheck_in_float64(name, channels, stacked, monkeypatch):
    monkeypatch.setattr(sparse, "STACK_BELOW_BYTES", 1 << 30 if stacked else 0)
    pattern = PATTERNS[name]()
    gen = torch.Generator().manual_seed(1)
    extra = () if channels is None else (channels,)
    double = dict(dtype=torch.float64, requires_grad=True)
    values = torch.randn(*extra, pattern.nnz, generator=gen, dtype=torch.float64).requires_grad_()
    x = torch.randn(*extra, pattern.num_cols, 2, generator=gen, **double)
    a = torch.randn(*extra, pattern.num_rows, 2, generator=gen, **double)
    assert torch.autograd.gradcheck(lambda v, y: spmm(pattern, v, y), (values, x))
    assert torch.autograd.gradcheck(lambda p, q: sddmm(pattern, p, q), (a, x))


def test_segment_softmax_is_pygs_softmax_with_a_fused_backward():
    gen = torch.Generator().manual_seed(2)
    ptr = torch.tensor([0, 3, 3, 4, 8])  # an empty segment and a single-entry one
    for src in (torch.randn(8, generator=gen), torch.randn(8, 3, generator=gen)):
        assert torch.equal(segment_softmax(src, ptr), pyg_softmax(src, ptr=ptr))  # bit for bit
        leaf_fast, leaf_ref = src.clone().requires_grad_(), src.clone().requires_grad_()
        upstream = torch.randn(src.shape, generator=gen)
        (segment_softmax(leaf_fast, ptr) * upstream).sum().backward()
        (pyg_softmax(leaf_ref, ptr=ptr) * upstream).sum().backward()
        torch.testing.assert_close(leaf_fast.grad, leaf_ref.grad)
    double = torch.randn(8, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: segment_softmax(z, ptr), (double,))
    with pytest.raises(ValueError, match="ptr must run from 0 to 8"):
        segment_softmax(torch.randn(8), torch.tensor([0, 3, 7]))


def test_l2_normalize_is_f_normalize_with_a_fused_backward():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 4, generator=gen)
    x[1, 0] = 0.0  # a zero row: the norm is clamped, the gradient is g / eps
    assert torch.equal(l2_normalize(x), F.normalize(x, dim=-1))
    leaf_fast, leaf_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=gen)
    (l2_normalize(leaf_fast) * upstream).sum().backward()
    (F.normalize(leaf_ref, dim=-1) * upstream).sum().backward()
    torch.testing.assert_close(leaf_fast.grad, leaf_ref.grad)
    double = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize, (double,))


def test_stacked_and_per_channel_products_agree_bit_for_bit(monkeypatch):
    pattern = user_item_pattern(small_graph())
    gen = torch.Generator().manual_seed(6)
    values = torch.randn(3, pattern.nnz, generator=gen)
    x, a = torch.randn(3, pattern.num_cols, 4, generator=gen), torch.randn(3, pattern.num_rows, 4, generator=gen)
    outputs = []
    for stack_below in (1 << 30, 0):
        monkeypatch.setattr(sparse, "STACK_BELOW_BYTES", stack_below)
        outputs.append((spmm(pattern, values, x), sddmm(pattern, a, x)))
    for stacked, per_channel in zip(*outputs, strict=True):
        assert torch.equal(stacked, per_channel)


def test_pattern_transpose():
    base = coo_pattern()
    # The transpose's entries really are the forward's entries t_perm, in the transpose's CSR order.
    for pattern in (base, stack_pattern(base, 2)):
        t_rows, _ = entries(pattern.transpose())
        forward_rows, forward_cols = entries(pattern)
        assert torch.equal(forward_cols[pattern.t_perm], t_rows)
        assert torch.equal(forward_rows[pattern.t_perm], pattern.t_col.long())
        assert torch.equal(pattern.transpose().transpose().t_perm, pattern.t_perm)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_every_pattern_and_transpose_satisfies_torchs_csr_invariants(name):
    pattern = PATTERNS[name]()
    for candidate in (pattern, stack_pattern(pattern, 3)):
        for rowptr, col, size in (
            (candidate.rowptr, candidate.col, (candidate.num_rows, candidate.num_cols)),
            (candidate.t_rowptr, candidate.t_col, (candidate.num_cols, candidate.num_rows)),
        ):
            values = torch.ones(col.numel())
            torch.sparse_csr_tensor(rowptr, col, values, size, check_invariants=True)  # raises when violated


@pytest.mark.parametrize("name", list(PATTERNS))
def test_every_transpose_lists_a_columns_entries_in_row_order(name):
    # What the pushed transposed products rely on (sparse._transposed_spmm_raw): within each row of the transpose the
    # forward's entries come in increasing order (of row, then storage).
    pattern = PATTERNS[name]()
    field = receptive_field(small_graph(), torch.tensor([0, 6, 9]), 2)
    for candidate in (pattern, stack_pattern(pattern, 3), *field.patterns):
        order = candidate.t_perm
        column_start = torch.zeros(candidate.nnz, dtype=torch.bool)
        column_start[candidate.t_rowptr[:-1].long().clamp(max=max(candidate.nnz - 1, 0))] = True
        assert bool(((order[1:] > order[:-1]) | column_start[1:]).all())


def test_graph_patterns_are_the_graphs_edges():
    graph = small_graph()
    pattern = graph_pattern(graph)
    rows, cols = entries(pattern)
    assert torch.equal(rows, graph.edge_index[1]) and torch.equal(cols, graph.edge_index[0])
    user_items = user_item_pattern(graph)
    rows, cols = entries(user_items)
    half = graph.num_edges // 2
    assert torch.equal(rows, graph.edge_index[1, :half]) and torch.equal(cols + 5, graph.edge_index[0, :half])
    assert pattern.rowptr.dtype == torch.int32 and pattern.t_perm.dtype == torch.int64


def test_pattern_and_shape_errors():
    with pytest.raises(ValueError, match="sorted by row, then column"):
        CSRPattern.from_coo(torch.tensor([1, 0]), torch.tensor([0, 0]), 2, 2)
    with pytest.raises(ValueError, match="distinct and sorted"):
        CSRPattern.from_coo(torch.tensor([0, 0]), torch.tensor([1, 0]), 2, 2)
    with pytest.raises(ValueError, match="distinct and sorted"):
        CSRPattern.from_coo(torch.tensor([0, 0]), torch.tensor([1, 1]), 2, 2)
    with pytest.raises(ValueError, match="inside the"):
        CSRPattern.from_coo(torch.tensor([0, 1]), torch.tensor([0, 2]), 2, 2)
    pattern = coo_pattern()
    with pytest.raises(ValueError, match="spmm: pattern"):
        spmm(pattern, torch.randn(pattern.nnz + 1), torch.randn(5, 2))
    with pytest.raises(ValueError, match="spmm: pattern"):
        spmm(pattern, torch.randn(2, pattern.nnz), torch.randn(2, 4, 2))
    with pytest.raises(ValueError, match="values \\[nnz\\] need features"):
        spmm(pattern, torch.randn(pattern.nnz), torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match="values \\[M, nnz\\] need \\[M, C, d\\]"):
        spmm(pattern, torch.randn(2, pattern.nnz), torch.randn(3, 5, 2))
    with pytest.raises(ValueError, match="sddmm: pattern"):
        sddmm(pattern, torch.randn(5, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="sddmm: inputs must be"):
        sddmm(pattern, torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="sddmm: inputs must be"):
        sddmm(pattern, torch.randn(2, 5, 2), torch.randn(3, 5, 2))


@pytest.mark.skipif(not _mkl_product(torch.ones(1), torch.ones(1, dtype=torch.int32)), reason="no MKL CSR product")
def test_mkl_product_ignores_its_output_when_beta_is_zero():
    """The premise of writing spmm into an uninitialised buffer: MKL never reads it when beta = 0."""
    pattern = coo_pattern()
    values, x = torch.randn(pattern.nnz), torch.randn(5, 3)
    matrix = torch.sparse_csr_tensor(pattern.rowptr, pattern.col, values, (5, 5), check_invariants=True)
    out = torch.full((5, 3), float("nan"))
    torch.addmm(out, matrix, x, beta=0.0, out=out)
    torch.testing.assert_close(out, gather_scatter_spmm(pattern, values, x))


def test_refined_propagation_fast_path_equals_the_reference_path():
    graph = small_graph()
    gen = torch.Generator().manual_seed(4)
    layer = RefinedPropagation()
    pattern = graph_pattern(graph)
    for shape in ((), (2,)):
        w = torch.randn(*shape, graph.num_edges, generator=gen, requires_grad=True)
        x = torch.randn(*shape, graph.num_nodes, 3, generator=gen, requires_grad=True)
        fast = layer(x, graph.edge_index, w, pattern=pattern)
        slow = layer(x, graph.edge_index, w)
        torch.testing.assert_close(fast, slow)
        upstream = torch.randn(fast.shape, generator=gen)
        for got, want in zip(torch.autograd.grad(fast, (w, x), upstream), torch.autograd.grad(slow, (w, x), upstream),
                             strict=True):
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="the pattern has"):
        layer(torch.randn(3, 2), graph.edge_index, torch.randn(graph.num_edges), pattern=graph_pattern(graph))


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


# ---------------------------------------------------------------------------------------------------- perf command


SMALL_REFERENCES = {"reference_size": 128, "reference_megabytes": 4}


class _Broken(Recommender):
    def __init__(self, data: DatasetInfo, **options):
        super().__init__(data)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, graph):
        raise RuntimeError("deliberately broken")


@pytest.fixture
def broken_model():
    register_model("perf_test_broken")(_Broken)
    yield "perf_test_broken"
    unregister_model("perf_test_broken")


def test_perf_in_process_reports_every_cell_and_records_failures(broken_model, tmp_path):
    settings = perf.PerfSettings(models=("mf", "grcn", broken_model), datasets=("synthetic:tiny",), batches=2,
                                 warmup=1, subprocess=False, **SMALL_REFERENCES)
    report = perf.run_perf(settings)
    assert set(report) >= {"settings", "machine", "references_start", "references_end", "cells"}
    assert all(value > 0 for value in report["references_start"].values())
    cells = {cell["model"]: cell for cell in report["cells"]}
    for name, width in (("mf", 64), ("grcn", 64 * 3)):
        cell = cells[name]
        assert cell["status"] == "ok" and cell["dataset"] == "synthetic:tiny"
        assert len(cell["train_batch_seconds"]) == cell["train_batches"] == 2
        assert cell["train_batch_median"] == pytest.approx(float(np.median(cell["train_batch_seconds"])))
        assert set(cell["eval_phases"]) == set(perf.PHASES) and cell["eval_users"] > 0
        assert cell["embedding_dim"] == width
        assert cell["scoring_fraction"] == pytest.approx(cell["scoring_gflops"] / cell["reference_gflops"])
        assert cell["peak_rss_bytes"] > 0 and cell["peak_gpu_bytes"] is None
    assert cells[broken_model]["status"] == "failed" and "deliberately broken" in cells[broken_model]["error"]
    table = perf.perf_table(report)
    assert "| mf" in table and "| grcn" in table and "failed" in table
    assert "matmul_gflops_numpy" in perf.references_table(report)


def test_perf_measures_both_kernels_side_by_side(monkeypatch):
    monkeypatch.delenv("GRCN_BENCH_KERNELS", raising=False)
    settings = perf.PerfSettings(models=("grcn",), datasets=("synthetic:tiny",), batches=1, warmup=0,
                                 subprocess=False, kernels=("native", "torch"), **SMALL_REFERENCES)
    report = perf.run_perf(settings)
    assert [(cell["model"], cell["kernels"], cell["status"]) for cell in report["cells"]] == [
        ("grcn", "native", "ok"), ("grcn", "torch", "ok")]
    assert report["cells"][1]["kernel_status"] == "GRCN_BENCH_KERNELS=torch"
    assert report["cells"][0]["kernel_status"] == native_status()
    assert "GRCN_BENCH_KERNELS" not in os.environ  # the choice was the cell's only
    assert "| kernels" in perf.perf_table(report)
    with pytest.raises(ValueError, match="kernels must be among"):
        perf.PerfSettings(kernels=("fast",))


def test_perf_command_line_writes_json(tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    perf.add_perf_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "perf.json"
    args = parser.parse_args(["perf", "--models", "mf", "--datasets", "synthetic:tiny", "--batches", "1",
                              "--warmup", "0", "--in-process", "--reference-size", "128", "--reference-mb", "4",
                              "--out", str(out)])
    assert perf.cmd_perf(args) == 0
    report = json.loads(out.read_text())
    assert [cell["model"] for cell in report["cells"]] == ["mf"]
    assert report["settings"]["batches"] == 1 and report["settings"]["subprocess"] is False
    assert "| mf" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = parser.parse_args(["perf", "--device", "cuda", "--out", str(out)])
    assert perf.cmd_perf(cuda) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_perf_settings_and_references_validate():
    with pytest.raises(ValueError, match="batches >= 1"):
        perf.PerfSettings(batches=0)
    with pytest.raises(ValueError, match="no dataset"):
        perf.PerfSettings(datasets=())
    with pytest.raises(KeyError, match="unknown model"):
        perf.run_perf(perf.PerfSettings(models=("no_such_model",), datasets=("synthetic:tiny",)))
    with pytest.raises(ValueError, match="unknown matmul library"):
        perf.matmul_gflops("cupy")
    assert perf.matmul_gflops("numpy", size=64, repeats=1) > 0
    assert perf.copy_bandwidth(megabytes=1, repeats=1) > 0


@pytest.mark.slow
def test_perf_runs_each_cell_in_a_fresh_process():
    report = perf.run_perf(perf.PerfSettings(models=("mf",), datasets=("synthetic:tiny",), batches=1, warmup=0,
                                             **SMALL_REFERENCES))
    (cell,) = report["cells"]
    assert cell["status"] == "ok" and cell["peak_rss_bytes"] > 0


# ------------------------------------------------------------------------------------------------ malloc settings


class _FakeLibc:
    def __init__(self, answer: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

        def mallopt(parameter: int, value: int) -> int:
            self.calls.append((parameter, value))
            return self.answer

        self.mallopt = mallopt


def test_keep_freed_memory_sets_glibcs_heap_options(monkeypatch):
    from grcn_bench.benchmarks import memory

    libc = _FakeLibc()
    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.delenv(memory.ENV_VARIABLE, raising=False)
    assert memory.can_keep_freed_memory() is True and libc.calls == []  # asking changes nothing
    assert memory.keep_freed_memory() is True
    # No mmap for large blocks (they come from the heap), and freed memory stays in the heap up to 2 GiB.
    assert libc.calls == [(-4, 0), (-1, 2**31 - 1)]

    libc.calls.clear()
    monkeypatch.setenv(memory.ENV_VARIABLE, "system")
    assert memory.keep_freed_memory() is False and libc.calls == []  # the opt-out leaves malloc alone
    assert memory.can_keep_freed_memory() is False

    monkeypatch.delenv(memory.ENV_VARIABLE)
    failing = _FakeLibc(answer=0)
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: failing)
    assert memory.keep_freed_memory() is False  # mallopt refused

    class NoMallopt:  # musl and other C libraries
        pass

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: NoMallopt())
    assert memory.keep_freed_memory() is False
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    assert memory.keep_freed_memory() is False and libc.calls == []


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_takes_effect_on_glibc(monkeypatch):
    from grcn_bench.benchmarks.memory import ENV_VARIABLE, keep_freed_memory

    monkeypatch.delenv(ENV_VARIABLE, raising=False)
    assert keep_freed_memory() is True


# ---------------------------------------------------------------------------------------------- the loss's gathers


def test_bpr_pair_scores_equal_two_gathers_bit_for_bit():
    from grcn_bench.models.losses import bpr_pair_scores

    gen = torch.Generator().manual_seed(5)
    # Repeated users, a row that is a positive twice and a negative twice, rows that are only negatives.
    users = torch.tensor([0, 3, 3, 1, 0, 3, 2, 2])
    pos = torch.tensor([4, 4, 1, 0, 5, 2, 4, 0])
    neg = torch.tensor([1, 6, 1, 6, 3, 0, 3, 6])
    base_user, base_item = torch.randn(5, 7, generator=gen), torch.randn(7, 7, generator=gen)
    g_pos, g_neg = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    leaves = [(base_user.clone().requires_grad_(), base_item.clone().requires_grad_()) for _ in range(2)]
    # Computed (non-leaf) tables, as the models' outputs that take this path.
    (user_a, item_a), (user_b, item_b) = [(u * 1.5, i * 1.5) for u, i in leaves]
    fused = bpr_pair_scores(user_a, item_a, users, pos, neg)
    separate = ((user_b[users] * item_b[pos]).sum(-1), (user_b[users] * item_b[neg]).sum(-1))
    for got, want in zip(fused, separate, strict=True):
        assert torch.equal(got, want)
    grads_fused = torch.autograd.grad(fused, [user_a, item_a], [g_pos, g_neg])
    grads_separate = torch.autograd.grad(separate, [user_b, item_b], [g_pos, g_neg])
    for got, want in zip(grads_fused, grads_separate, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(grads_fused[1][6], torch.zeros(7))  # a negative-only row does get its gradient


@pytest.mark.parametrize("computed", [True, False], ids=["computed-outputs", "parameter-outputs"])
def test_the_loss_sums_gradients_as_two_separate_gathers_would(computed):
    """``Recommender.loss`` takes the one-buffer path for computed outputs and keeps two gathers where the outputs are
    the parameters themselves (BPR-MF): either way, bit for bit the gradients of the plain two-call loss."""
    from grcn_bench.models.losses import bpr_loss, ego_l2

    dataset = load_dataset("synthetic:tiny")
    users = torch.tensor([0, 3, 3, 1, 3, 2])  # repeated users and items: the order of the sums matters
    pos, neg = torch.tensor([4, 4, 1, 0, 2, 4]), torch.tensor([1, 6, 1, 6, 3, 6])
    grads = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = MF(dataset.info(), embedding_dim=8)
        emb = model(dataset.graph())
        if computed:
            emb = Embeddings(emb.user * 1.5, emb.item * 1.5)
        if fused:
            loss = model.loss(emb, users, pos, neg, 0.1)
        else:
            plain = (model.pair_score(emb, users, pos), model.pair_score(emb, users, neg))
            loss = bpr_loss(*plain) + 0.1 * ego_l2(model.ego_parameters(users, pos, neg))
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for got, want in zip(*grads, strict=True):
        assert torch.equal(got, want)


def test_stacked_rowptr_and_indices_by_hand():
    from grcn_bench.models.layers.sparse import stacked_indices, stacked_rowptr

    rowptr, col = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 0, 1])  # 3 rows (one empty), 2 columns
    assert stacked_rowptr(rowptr, 2).tolist() == [0, 2, 2, 3, 5, 5, 6]
    ptr, cols = stacked_indices(rowptr.int(), col.int(), 2, num_cols=2)
    assert ptr.tolist() == [0, 2, 2, 3, 5, 5, 6] and cols.tolist() == [1, 0, 1, 3, 2, 3]
    assert ptr.dtype == cols.dtype == torch.int32
