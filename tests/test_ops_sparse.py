"""``ops.sparse``: the sparse products, their gradients and the segment operations against plain gather and scatter
(and PyG's softmax), in float32 and by gradcheck in float64; every pattern builder's invariants."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.utils import softmax as pyg_softmax

from grcn_bench.datasets.base import InteractionGraph
from grcn_bench.models.ops import sparse
from grcn_bench.models.ops.field import receptive_field
from grcn_bench.models.ops.sparse import (
    CSRPattern,
    _mkl_product,
    graph_pattern,
    sddmm,
    segment_softmax,
    spmm,
    stack_pattern,
    stacked_indices,
    stacked_rowptr,
    user_item_pattern,
)

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


def test_stacked_rowptr_and_indices_by_hand():
    rowptr, col = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 0, 1])  # 3 rows (one empty), 2 columns
    assert stacked_rowptr(rowptr, 2).tolist() == [0, 2, 2, 3, 5, 5, 6]
    ptr, cols = stacked_indices(rowptr.int(), col.int(), 2, num_cols=2)
    assert ptr.tolist() == [0, 2, 2, 3, 5, 5, 6] and cols.tolist() == [1, 0, 1, 3, 2, 3]
    assert ptr.dtype == cols.dtype == torch.int32
