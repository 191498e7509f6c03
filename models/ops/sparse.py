r"""Weighted propagation over a fixed sparsity pattern, with backward passes that reuse the forward's index structures.

Two operations and their gradients cover every learned-weight propagation in the suite (GRCN's routing, affinities
and refined convolution; any attention-weighted layer):

- :func:`spmm`, the weighted sum over a node's in-neighbours, :math:`\mathbf{y}_r = \sum_{k \in \mathrm{row}(r)}
  w_k \mathbf{x}_{c_k}`, i.e. :math:`\mathbf{Y} = \mathbf{A}\mathbf{X}` with :math:`\mathbf{A}` sparse;
- :func:`sddmm`, one dot product per stored entry, :math:`z_k = \mathbf{a}_{r_k}^\top \mathbf{b}_{c_k}` (the sampled
  dense-dense product :math:`(\mathbf{A} \mathbf{B}^\top) \odot \operatorname{spy}(\mathbf{A})`).

Each is the other's backward:

.. math::
    \frac{\partial L}{\partial \mathbf{X}} = \mathbf{A}^\top \frac{\partial L}{\partial \mathbf{Y}}, \qquad
    \frac{\partial L}{\partial w_k} = \Big(\frac{\partial L}{\partial \mathbf{y}_{r_k}}\Big)^\top \mathbf{x}_{c_k},
    \qquad
    \frac{\partial L}{\partial \mathbf{a}_r} = \sum_{k \in \mathrm{row}(r)} \frac{\partial L}{\partial z_k}
    \mathbf{b}_{c_k}, \qquad
    \frac{\partial L}{\partial \mathbf{b}_c} = \sum_{k \in \mathrm{col}(c)} \frac{\partial L}{\partial z_k}
    \mathbf{a}_{r_k}

so a forward and its backward never materialise an ``[nnz, d]`` tensor: both run as CSR sparse-dense products
(``torch.sparse.mm``) and sampled products (``torch.sparse.sampled_addmm``) instead of gather, multiply and scatter,
and on x86-64 CPUs as the compiled kernels of :mod:`.native`, which compute the same sums. torch's own backward of a
CSR product rebuilds the transpose by sorting at every call; :class:`CSRPattern` carries the transpose's structure
and the permutation that maps its entries to the forward's (for :class:`~grcn_bench.datasets.base.InteractionGraph`
the pattern is symmetric and the permutation is ``reverse_edge``: no sorting at all).

Several channels at once: weights ``[M, nnz]`` with features ``[M, C, d]`` apply channel ``m``'s weights to channel
``m``'s features over the same pattern (GRCN's modalities), channel-major so that each channel's operands are
contiguous blocks. Large channels run as one product each, whose dense operand stays small enough for the cache
(one product over the block-diagonal pattern of all channels has an operand as large as all of them). Small ones
(all channels under :data:`STACK_BELOW_BYTES`) run as one product over that stacked pattern, where the fixed cost of
each call dominates. Both give the same bits.

Shapes (``R`` rows, ``C`` columns, ``nnz`` stored entries, optional leading ``M`` channels):

- :func:`spmm`: ``values [nnz]`` with ``x [C, d]`` → ``[R, d]``; ``values [M, nnz]`` with ``x [M, C, d]`` →
  ``[M, R, d]``.
- :func:`sddmm`: ``a [R, d]``, ``b [C, d]`` → ``[nnz]``; ``a [M, R, d]``, ``b [M, C, d]`` → ``[M, nnz]``.

How another model can use them: a GAT- or DisenGCN-style layer over an ``InteractionGraph`` computes its per-edge
logits with ``sddmm(graph_pattern(graph), queries, keys)`` (or gathers them as it does now), normalises them with
``torch_geometric.utils.softmax(logits, ptr=graph.rowptr)``, and aggregates with ``spmm(graph_pattern(graph),
attention, x)`` instead of PyG's gather and scatter; heads or channels are the leading ``M`` dimension.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .native import (
    family_status,
    run_sddmm,
    run_sddmm_backward_pushed,
    run_segment_apply,
    run_segment_reduce,
    run_spmm,
    run_spmm_pushed,
)

__all__ = [
    "CSRPattern", "graph_pattern", "headed_sddmm", "headed_spmm", "sddmm", "segment_broadcast", "segment_reduce",
    "segment_softmax", "spmm", "stack_pattern", "stacked_indices", "stacked_rowptr", "user_item_pattern",
]

#: Channel-major transposed products of rows at most this wide are pushed along the forward's rows
#: (:func:`_transposed_spmm_raw`): pushing saves the pull's scattered reads of a row and its weight per entry. Wider
#: rows stay pulled: pushed, each entry then reads and writes several cache lines of the output, which costs more
#: than it saves (docs/kernels.md, "Sparse products").
PUSH_MAX_WIDTH = 16

#: Channel-major operands smaller than this run as one product over the channels' stacked pattern, larger ones as one
#: product per channel (:func:`_stack_channels`).
STACK_BELOW_BYTES = 8 << 20


@dataclass(frozen=True)
class CSRPattern:
    """The sparsity pattern of an ``[R, C]`` matrix in CSR order, with the pattern of its transpose.

    Entry ``k`` sits in row ``r_k`` (rows are contiguous: ``rowptr``) and column ``col[k]``. The transpose's entries,
    in its own CSR order, are the forward's entries ``t_perm``: entry ``j`` of ``A^T`` holds ``values[t_perm[j]]``.
    Every builder lists each column's entries in the order of their rows (``t_perm`` increases within each of the
    transpose's rows), so a transposed product summed along ``A``'s rows has the same sums (:func:`_transposed_spmm_raw`
    relies on it; a pattern built by hand must keep it too).
    The builders below store the four CSR index arrays as int32 when they fit (what the CPU kernels take); ``t_perm``
    is int64.

    Args:
        rowptr: ``[R+1]`` row pointer.
        col: ``[nnz]`` column of every entry, rows in order.
        t_rowptr: ``[C+1]`` row pointer of the transpose.
        t_col: ``[nnz]`` column of every entry of the transpose (a row of ``A``), in the transpose's CSR order.
        t_perm: ``[nnz]`` forward entry of every entry of the transpose.
        num_rows: ``R``.
        num_cols: ``C``.
    """

    rowptr: Tensor
    col: Tensor
    t_rowptr: Tensor
    t_col: Tensor
    t_perm: Tensor
    num_rows: int
    num_cols: int

    @property
    def nnz(self) -> int:
        return self.col.numel()

    def transpose(self) -> CSRPattern:
        """The pattern of ``A^T``; its ``t_perm`` is the inverse permutation of this one's."""
        inverse = torch.empty_like(self.t_perm)
        inverse[self.t_perm] = torch.arange(self.nnz, device=self.t_perm.device)
        return CSRPattern(self.t_rowptr, self.t_col, self.rowptr, self.col, inverse, self.num_cols, self.num_rows)

    @classmethod
    def from_coo(cls, row: Tensor, col: Tensor, num_rows: int, num_cols: int) -> CSRPattern:
        """A pattern from distinct entries sorted by row, then column (torch's CSR invariant); the transpose is
        sorted here, once."""
        row, col = row.long(), col.long()
        if row.numel() and (int(row.min()) < 0 or int(row.max()) >= num_rows or int(col.min()) < 0
                            or int(col.max()) >= num_cols):
            raise ValueError(f"entries must lie inside the [{num_rows}, {num_cols}] matrix")
        key = row * max(1, num_cols) + col
        if key.numel() and bool((key[1:] <= key[:-1]).any()):
            raise ValueError("entries must be distinct and sorted by row, then column (CSR order)")
        order = torch.argsort(col * max(1, num_rows) + row, stable=True)
        nnz = col.numel()
        return cls(
            rowptr=_compact(_rowptr(row, num_rows), nnz),
            col=_compact(col, num_cols),
            t_rowptr=_compact(_rowptr(col[order], num_cols), nnz),
            t_col=_compact(row[order], num_rows),
            t_perm=order,
            num_rows=num_rows,
            num_cols=num_cols,
        )


def _compact(index: Tensor, bound: int) -> Tensor:
    """CSR indices as int32 when every value fits: the CPU sparse kernels (MKL) take int32 and would otherwise convert
    both index arrays at every call."""
    return index.to(torch.int32) if bound < 2**31 else index.long()


def _rowptr(sorted_rows: Tensor, num_rows: int) -> Tensor:
    ptr = torch.zeros(num_rows + 1, dtype=torch.long, device=sorted_rows.device)
    torch.cumsum(torch.bincount(sorted_rows, minlength=num_rows), 0, out=ptr[1:])
    return ptr


def graph_pattern(graph) -> CSRPattern:
    """The ``[N, N]`` pattern ``A[target, source]`` of an :class:`~grcn_bench.datasets.base.InteractionGraph`.

    The graph holds both directions of every pair, sorted by target, so its transpose has the same structure and
    its entries are the reverse edges: no sorting, only the graph's own tensors (as int32 when they fit).
    """
    n = graph.num_nodes
    rowptr, col = _compact(graph.rowptr, graph.num_edges), _compact(graph.edge_index[0], n)
    return CSRPattern(rowptr, col, rowptr, col, graph.reverse_edge, n, n)


def user_item_pattern(graph) -> CSRPattern:
    """The ``[U, I]`` pattern of the ``item -> user`` edges (row = user, column = item id in ``0..I-1``).

    They are the graph's first ``E`` directed edges (targets sorted, users first), so entry ``k`` is edge ``k``; the
    transpose is the last ``E`` edges (``user -> item``, sorted by item), whose reverses point into the first half.
    """
    num_users, num_pairs = graph.num_users, graph.num_edges // 2
    rowptr = graph.rowptr
    return CSRPattern(
        rowptr=_compact(rowptr[: num_users + 1], num_pairs),
        col=_compact(graph.edge_index[0, :num_pairs] - num_users, graph.num_items),
        t_rowptr=_compact(rowptr[num_users:] - num_pairs, num_pairs),
        t_col=_compact(graph.edge_index[0, num_pairs:], num_users),
        t_perm=graph.reverse_edge[num_pairs:],
        num_rows=num_users,
        num_cols=graph.num_items,
    )


# ------------------------------------------------------------------------------------------------------ raw kernels


def _csr(rowptr: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch flags CSR support as beta, once per process; the API used here is stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        # Some torch versions (2.11) warn even though the skip is asked for: the patterns are built valid, once.
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(rowptr, col, values, size, check_invariants=False)


def _spmm_raw(rowptr: Tensor, col: Tensor, values: Tensor, x: Tensor, num_rows: int,
              value_order: Tensor | None = None) -> Tensor:
    """``[R, d]`` (or ``[M, R, d]`` for ``values [M, nnz]``, ``x [M, C, d]``, one product per channel): CSR
    sparse-dense products, written straight into the output (``torch.sparse.mm`` adds a zero fill and a full copy of
    the result). MKL's product never reads the output when ``beta=0`` (a test checks it), so on that path the output
    needs no zero fill. With ``value_order``, entry ``k``'s weight is ``values[..., value_order[k]]``: the compiled
    kernel reads it in place, torch's kernels get the gathered copy."""
    if x.dim() == 3 and _stack_channels(x, col.numel()):
        if value_order is not None:
            values = values.index_select(-1, value_order)
        ptr, cols = stacked_indices(rowptr, col, x.size(0), x.size(1))
        out = _spmm_raw(ptr, cols, values.reshape(-1), x.reshape(-1, x.size(2)), x.size(0) * num_rows)
        return out.view(x.size(0), num_rows, x.size(2))
    shape = (*values.shape[:-1], num_rows, x.size(-1))
    out = x.new_empty(shape) if _writes_every_row(x, rowptr) else x.new_zeros(shape)
    for channel_values, channel_x, channel_out in _per_channel(values, x, out):
        channel_values, channel_x = channel_values.contiguous(), channel_x.contiguous()
        if not run_spmm(rowptr, col, channel_values, channel_x, channel_out, value_order=value_order):
            if value_order is not None:
                channel_values = channel_values.index_select(0, value_order)
            matrix = _csr(rowptr, col, channel_values, (num_rows, channel_x.size(0)))
            torch.addmm(channel_out, matrix, channel_x, beta=0.0, out=channel_out)
    return out


def _stack_channels(x: Tensor, nnz: int) -> bool:
    """Whether the channels of ``x [M, C, d]`` run as one product over their stacked pattern (the same sums either
    way): when all of them fit in :data:`STACK_BELOW_BYTES`, the ~40 us that each product call costs outweighs what
    one product per channel saves (a dense operand that stays in cache), as long as the stacked indices fit."""
    return x.numel() * x.element_size() < STACK_BELOW_BYTES and x.size(0) * nnz < 2**31


def stacked_rowptr(rowptr: Tensor, copies: int) -> Tensor:
    """The row pointer of ``copies`` copies of a CSR pattern's rows, one after another (``[copies * R + 1]``, in
    ``rowptr``'s dtype): copy ``m``'s entries start at ``m * nnz``. Also the segment pointer of a ``[copies, nnz]``
    tensor of per-entry values, flattened."""
    offset = torch.arange(copies, dtype=rowptr.dtype, device=rowptr.device).unsqueeze(1) * rowptr[-1]
    return torch.cat([(rowptr[:-1].unsqueeze(0) + offset).flatten(), rowptr[-1:] * copies])


def stacked_indices(rowptr: Tensor, col: Tensor, copies: int, num_cols: int) -> tuple[Tensor, Tensor]:
    """CSR ``(rowptr, col)`` of ``copies`` copies of a pattern down the diagonal: copy ``m`` at rows ``m*R..``,
    columns ``m*C..`` and entries ``m*nnz..``, in ``rowptr``'s and ``col``'s dtypes (:func:`stack_pattern` adds the
    transpose)."""
    offset = torch.arange(copies, dtype=col.dtype, device=col.device).unsqueeze(1) * num_cols
    return stacked_rowptr(rowptr, copies), (col.unsqueeze(0) + offset).flatten()


def stack_pattern(pattern: CSRPattern, copies: int) -> CSRPattern:
    r"""The block-diagonal ``[M*R, M*C]`` pattern of ``M = copies`` copies of ``pattern``, channel-major: copy ``m``
    holds rows ``m*R .. m*R+R-1``, columns ``m*C ..`` and entries ``m*nnz ..`` (in ``pattern``'s order).

    With it, ``M`` channels of a propagation run as one :func:`spmm` / :func:`sddmm`: values
    ``[M, nnz]`` and features ``[M, C, d]``, both flattened over their first two dimensions. The arrays are
    ``pattern``'s own plus an offset per copy, so building it costs a few copies of the index arrays. Where the
    compiled kernels run, :func:`headed_spmm` and :func:`headed_sddmm` compute the same sums without it.
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an int >= 1, got {copies!r}")
    nnz, rows, cols = pattern.nnz, pattern.num_rows, pattern.num_cols
    fits = copies * max(nnz, rows, cols) < 2**31  # int32 indices for the CPU kernels whenever they fit
    index_dtype = torch.int32 if fits else torch.long

    def stacked(ptr: Tensor, col: Tensor, num_cols: int) -> tuple[Tensor, Tensor]:
        return stacked_indices(ptr.to(index_dtype), col.to(index_dtype), copies, num_cols)

    rowptr, col = stacked(pattern.rowptr, pattern.col, cols)
    if pattern.t_rowptr is pattern.rowptr and pattern.t_col is pattern.col:  # symmetric structure (graph_pattern)
        t_rowptr, t_col = rowptr, col
    else:
        t_rowptr, t_col = stacked(pattern.t_rowptr, pattern.t_col, rows)
    copy = torch.arange(copies, device=pattern.t_perm.device).unsqueeze(1)
    t_perm = (pattern.t_perm.unsqueeze(0) + copy * nnz).view(-1)
    return CSRPattern(rowptr, col, t_rowptr, t_col, t_perm, copies * rows, copies * cols)


def _per_channel(*tensors: Tensor) -> Iterable[tuple[Tensor, ...]]:
    """``(t_0[m], t_1[m], ...)`` for every channel ``m`` when the last tensor is channel-major (3-d), else the
    tensors themselves once."""
    return zip(*tensors, strict=True) if tensors[-1].dim() == 3 else (tensors,)


def _mkl_product(x: Tensor, rowptr: Tensor) -> bool:
    """Whether torch runs a CSR product with MKL (CPU, float32/64, int32 indices), which ignores the output's values
    when ``beta=0``."""
    return (
        x.device.type == "cpu"
        and torch.backends.mkl.is_available()
        and x.dtype in (torch.float32, torch.float64)
        and rowptr.dtype == torch.int32
    )


def _writes_every_row(x: Tensor, rowptr: Tensor) -> bool:
    """Whether the product of :func:`_spmm_raw` writes every output row itself (MKL's or the compiled kernel), so
    that the output needs no zero fill."""
    compiled = family_status("sparse") == "native" and x.dtype == torch.float32 and x.device.type == "cpu"
    return _mkl_product(x, rowptr) or compiled and rowptr.dtype == torch.int32


def _sddmm_raw(rowptr: Tensor, col: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``[nnz]`` (or ``[M, nnz]`` for ``a [M, R, d]``, ``b [M, C, d]``): ``a[r_k] . b[col_k]`` per entry without
    gathering rows, written by the compiled kernel, or by torch's into the values of a CSR matrix that wraps the
    output (without ``out`` torch's kernel clones its input's values and indices first)."""
    if b.dim() == 3 and _stack_channels(b, col.numel()):
        ptr, cols = stacked_indices(rowptr, col, b.size(0), b.size(1))
        width = b.size(2)
        return _sddmm_raw(ptr, cols, a.reshape(-1, width), b.reshape(-1, width)).view(b.size(0), -1)
    products = a.new_empty((*a.shape[:-2], col.numel()))
    for channel_out, channel_a, channel_b in _per_channel(products, a, b):
        channel_a, channel_b = channel_a.contiguous(), channel_b.contiguous()
        if not run_sddmm(rowptr, col, channel_a, channel_b, channel_out):
            out = _csr(rowptr, col, channel_out.zero_(), (channel_a.size(0), channel_b.size(0)))  # beta=0 reads it
            # The CSR tensor wraps channel_out as its values, no copy (a test checks it): the result lands there.
            torch.sparse.sampled_addmm(out, channel_a, channel_b.t(), beta=0.0, out=out)
    return products


# ---------------------------------------------------------------------------------------------- autograd functions


def _compiled(out: Tensor, ran: bool) -> Tensor:
    """``out``, written by a compiled kernel that took the operands (:func:`headed_spmm` checked them first)."""
    if not ran:
        raise RuntimeError("the compiled sparse kernels refused the operands of a headed product")
    return out


def _headed_spmm_raw(rowptr: Tensor, col: Tensor, values: Tensor, x: Tensor, num_rows: int,
                     value_order: Tensor | None = None) -> Tensor:
    """``[R, H, d]`` for ``values [nnz, H]``, ``x [C, H, d]``: head ``h`` of each row is one :func:`_spmm_raw` with
    ``values[:, h]``, every head's row gathered once (compiled kernels only)."""
    x = x.contiguous()
    out = x.new_empty(num_rows, *x.shape[1:])
    return _compiled(out, run_spmm(rowptr, col, values.contiguous(), x, out, value_order=value_order))


def _headed_sddmm_raw(rowptr: Tensor, col: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``[nnz, H]`` for ``a [R, H, d]``, ``b [C, H, d]``: one :func:`_sddmm_raw` per head (compiled kernels only)."""
    out = a.new_empty(col.numel(), a.size(1))
    return _compiled(out, run_sddmm(rowptr, col, a.contiguous(), b.contiguous(), out))


def _kernels(headed: bool) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """The raw product and sampled product: one channel (or channel-major ``[M, ...]``), or node-major heads."""
    return (_headed_spmm_raw, _headed_sddmm_raw) if headed else (_spmm_raw, _sddmm_raw)


def _pushes(x: Tensor) -> bool:
    """Whether a transposed product with rows of channel-major ``x [M, R, d]`` is pushed (:func:`_transposed_spmm_raw`):
    narrow channels, shared out evenly among the threads, one channel each at a time."""
    return x.dim() == 3 and 0 < x.size(2) <= PUSH_MAX_WIDTH and x.size(0) % torch.get_num_threads() == 0


def _sampled_backward_pushed(pattern: CSRPattern, grad: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(dL/da, dL/db)`` of a channel-major sampled product in one walk over the rows, where its transposed product
    is pushed (:func:`~.native.run_sddmm_backward_pushed`, the same sums, with each entry's rows of ``b`` and of its
    gradient fetched together); ``None`` otherwise."""
    if not _pushes(a):
        return None
    grad, a, b = grad.contiguous(), a.contiguous(), b.contiguous()
    grad_a, grad_b = a.new_empty(a.shape), b.new_empty(b.shape)
    ran = run_sddmm_backward_pushed(pattern.rowptr, pattern.col, grad, a, b, grad_a, grad_b)
    return (grad_a, grad_b) if ran else None


def _transposed_spmm_raw(pattern: CSRPattern, values: Tensor, x: Tensor, headed: bool) -> Tensor:
    """``A^T`` with ``A``'s weights: ``[C, d]`` (heads: ``[C, H, d]``, channels: ``[M, C, d]``) from ``x`` over ``A``'s
    rows, the backward of a product to its features and of a sampled product to its right operand. Channels of at most
    :data:`PUSH_MAX_WIDTH` columns, as many as the threads or a multiple, are pushed along ``A``'s rows
    (:func:`~.native.run_spmm_pushed`, the same sums); otherwise the product over the transpose's pattern reads the
    weights through ``t_perm``."""
    if not headed and _pushes(x):
        out = x.new_empty(x.size(0), pattern.num_cols, x.size(2))
        if run_spmm_pushed(pattern.rowptr, pattern.col, values.contiguous(), x.contiguous(), out):
            return out
    spmm_raw, _ = _kernels(headed)
    return spmm_raw(pattern.t_rowptr, pattern.t_col, values, x, pattern.num_cols, pattern.t_perm)


class _SpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pattern: CSRPattern, values: Tensor, x: Tensor, headed: bool) -> Tensor:
        ctx.pattern, ctx.headed = pattern, headed
        ctx.save_for_backward(values, x)
        spmm_raw, _ = _kernels(headed)
        return spmm_raw(pattern.rowptr, pattern.col, values, x, pattern.num_rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None, None]:
        pattern: CSRPattern = ctx.pattern
        values, x = ctx.saved_tensors
        spmm_raw, sddmm_raw = _kernels(ctx.headed)
        grad_values = grad_x = None
        if ctx.needs_input_grad[1]:  # dL/dw_k = dL/dy[r_k] . x[col_k] (per head)
            grad_values = sddmm_raw(pattern.rowptr, pattern.col, grad, x)
        if ctx.needs_input_grad[2]:  # dL/dX = A^T dL/dY; A^T's values are the forward's, permuted by t_perm
            grad_x = _transposed_spmm_raw(pattern, values, grad, ctx.headed)
        return None, grad_values, grad_x, None


class _SDDMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pattern: CSRPattern, a: Tensor, b: Tensor, headed: bool) -> Tensor:
        ctx.pattern, ctx.headed = pattern, headed
        ctx.save_for_backward(a, b)
        _, sddmm_raw = _kernels(headed)
        return sddmm_raw(pattern.rowptr, pattern.col, a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None, None]:
        pattern: CSRPattern = ctx.pattern
        a, b = ctx.saved_tensors
        if ctx.needs_input_grad[1] and ctx.needs_input_grad[2] and not ctx.headed:
            both = _sampled_backward_pushed(pattern, grad, a, b)
            if both is not None:
                return None, *both, None
        spmm_raw, _ = _kernels(ctx.headed)
        grad_a = grad_b = None
        if ctx.needs_input_grad[1]:  # dL/da_r = sum over row r of dL/dz_k b[col_k] (per head)
            grad_a = spmm_raw(pattern.rowptr, pattern.col, grad, b, pattern.num_rows)
        if ctx.needs_input_grad[2]:  # dL/db_c = sum over column c of dL/dz_k a[r_k]
            grad_b = _transposed_spmm_raw(pattern, grad, a, ctx.headed)
        return None, grad_a, grad_b, None


def segment_reduce(src: Tensor, reduce: str, ptr: Tensor) -> Tensor:
    """``torch.segment_reduce(src, reduce, offsets=ptr, axis=0)`` for ``"sum"`` and ``"max"`` (``ptr`` int64, from
    0), by the compiled kernel where it runs (the same sums, in the same order; torch's is a single-threaded scalar
    loop), else by torch. Not differentiable: it runs inside the softmaxes' own autograd functions."""
    out = src.new_empty((ptr.numel() - 1, *src.shape[1:]))
    if run_segment_reduce(src.contiguous(), ptr, reduce, out):
        return out
    return torch.segment_reduce(src, reduce, offsets=ptr, axis=0)


def segment_broadcast(src: Tensor, ptr: Tensor, values: Tensor, op: str, *, out: Tensor | None = None) -> Tensor:
    """``src - values.repeat_interleave(count, dim=0)`` (``op="sub"``) or ``src / ...`` (``"div"``), ``count`` the
    segments' lengths from ``ptr`` (int64, from 0 to ``src.size(0)``): by the compiled kernel where it runs (the same
    bits, without the repeated copy), else by torch. With ``out`` (which may be ``src``) the result is written there.
    Not differentiable: it runs inside the softmaxes' own autograd functions."""
    if op not in ("sub", "div"):
        raise ValueError(f"segment_broadcast: op must be 'sub' or 'div', got {op!r}")
    target = src.new_empty(src.shape) if out is None else out
    if run_segment_apply(src, ptr, values, op, target):
        return target
    repeated = values.repeat_interleave(ptr[1:] - ptr[:-1], dim=0, output_size=src.size(0))
    if op == "sub":
        return torch.sub(src, repeated, out=out)
    return torch.div(src, repeated, out=out)


class _SegmentSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src: Tensor, ptr: Tensor) -> Tensor:
        # The same operations as torch_geometric.utils.softmax(src, ptr=ptr), so the values are bit for bit PyG's.
        src_max = segment_reduce(src, "max", ptr)
        src_max = torch.where(src_max.isinf(), 0, src_max)  # empty segments; they have no entry to shift
        out = segment_broadcast(src, ptr, src_max, "sub").exp_()
        out_sum = segment_reduce(out, "sum", ptr) + 1e-16
        segment_broadcast(out, ptr, out_sum, "div", out=out)
        ctx.save_for_backward(out, ptr)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out, ptr = ctx.saved_tensors
        # d softmax: p * (g - sum_segment(p * g)), one pass instead of autograd's trip through every forward step.
        dot = segment_reduce(out * grad, "sum", ptr)
        return segment_broadcast(grad, ptr, dot, "sub").mul_(out), None


# --------------------------------------------------------------------------------------------------------- public


def segment_softmax(src: Tensor, ptr: Tensor) -> Tensor:
    r"""Softmax over the contiguous segments ``ptr[s]..ptr[s+1]`` of dimension 0 (each CSR row's entries):
    :math:`p_k = \exp(z_k - \max_s z) / (\sum_{k' \in s} \exp(z_{k'} - \max_s z) + 10^{-16})`.

    The values are those of ``torch_geometric.utils.softmax(src, ptr=ptr)``; the backward is one fused pass
    :math:`\partial z_k = p_k (\partial p_k - \sum_{k' \in s} p_{k'} \partial p_{k'})` (the :math:`10^{-16}` that
    guards empty sums is left out of the derivative). ``src`` is ``[n]`` or ``[n, M]`` (one softmax per column).
    """
    ptr = ptr.long()
    if ptr.dim() != 1 or ptr.numel() < 1 or int(ptr[-1]) != src.size(0) or int(ptr[0]) != 0:
        raise ValueError(f"segment_softmax: ptr must run from 0 to {src.size(0)}, got {ptr.numel()} entries")
    return _SegmentSoftmax.apply(src, ptr)


def spmm(pattern: CSRPattern, values: Tensor, x: Tensor) -> Tensor:
    r"""Weighted sum over each row's entries: :math:`\mathbf{y}_r = \sum_{k \in \mathrm{row}(r)} w_k
    \mathbf{x}_{c_k}`, per channel when ``values`` is ``[M, nnz]`` and ``x`` is ``[M, C, d]`` (channel ``m``'s
    weights on channel ``m``'s features).

    Differentiable in ``values`` and ``x``; returns ``[R, d]`` or ``[M, R, d]``.
    """
    channel_major = values.dim() == 2 and x.dim() == 3 and values.size(0) == x.size(0)
    if not (values.dim() == 1 and x.dim() == 2 or channel_major):
        raise ValueError(
            f"spmm: values [nnz] need features [C, d], values [M, nnz] need [M, C, d]; got {tuple(values.shape)} "
            f"and {tuple(x.shape)}"
        )
    if values.size(-1) != pattern.nnz or x.size(-2) != pattern.num_cols:
        raise ValueError(
            f"spmm: pattern [{pattern.num_rows}, {pattern.num_cols}] with {pattern.nnz} entries, got values "
            f"{tuple(values.shape)} and features {tuple(x.shape)}"
        )
    return _SpMM.apply(pattern, values, x, False)


def sddmm(pattern: CSRPattern, a: Tensor, b: Tensor) -> Tensor:
    r"""One dot product per stored entry, :math:`z_k = \mathbf{a}_{r_k}^\top \mathbf{b}_{c_k}`, per channel for
    ``[M, R, d]`` and ``[M, C, d]`` inputs. Differentiable in ``a`` and ``b``; returns ``[nnz]`` or ``[M, nnz]``."""
    if a.dim() not in (2, 3) or a.dim() != b.dim() or a.shape[:-2] != b.shape[:-2] or a.size(-1) != b.size(-1):
        raise ValueError(f"sddmm: inputs must be [n, d] or [M, n, d] alike, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.size(-2) != pattern.num_rows or b.size(-2) != pattern.num_cols:
        raise ValueError(
            f"sddmm: pattern [{pattern.num_rows}, {pattern.num_cols}], got left {tuple(a.shape)} and right "
            f"{tuple(b.shape)}"
        )
    return _SDDMM.apply(pattern, a, b, False)


def _compiled_heads(pattern: CSRPattern, *tensors: Tensor) -> bool:
    """Whether the compiled kernels take these operands of a headed product (float32 CPU, int32 indices, a head width
    that is a multiple of 8)."""
    return (
        family_status("sparse") == "native"
        and pattern.rowptr.dtype == torch.int32 and pattern.col.dtype == torch.int32
        and pattern.t_rowptr.dtype == torch.int32 and pattern.t_col.dtype == torch.int32
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and tensors[-1].size(-1) % 8 == 0 and tensors[-1].size(-1) > 0
    )


def headed_spmm(pattern: CSRPattern, values: Tensor, x: Tensor) -> Tensor:
    r""":func:`spmm` for ``H`` heads that share the pattern, node-major: head :math:`h` of row :math:`r` is
    :math:`\mathbf{y}_{r,h} = \sum_{k \in \mathrm{row}(r)} w_{k,h} \mathbf{x}_{c_k,h}` (GAT's heads, DisenGCN's
    channels).

    ``values [nnz, H]``, ``x [C, H, d]`` → ``[R, H, d]``; differentiable in both. The sums are those of one
    :func:`spmm` per head, bit for bit; the compiled kernels gather each row once for all heads (where one product
    over :func:`stack_pattern`'s block pattern gathers it once per head), and where they cannot
    run (or the head width is not a multiple of 8) it is that block product, whose result may be a non-contiguous
    view.
    """
    if values.dim() != 2 or x.dim() != 3 or values.size(1) != x.size(1):
        raise ValueError(f"headed_spmm: values [nnz, H] need features [C, H, d]; got {tuple(values.shape)} and "
                         f"{tuple(x.shape)}")
    if values.size(0) != pattern.nnz or x.size(0) != pattern.num_cols:
        raise ValueError(f"headed_spmm: pattern [{pattern.num_rows}, {pattern.num_cols}] with {pattern.nnz} entries, "
                         f"got values {tuple(values.shape)} and features {tuple(x.shape)}")
    heads, width = x.size(1), x.size(2)
    if _compiled_heads(pattern, values, x):
        return _SpMM.apply(pattern, values, x, True)
    out = spmm(stack_pattern(pattern, heads), values.t().contiguous().view(-1),
               x.transpose(0, 1).contiguous().view(-1, width))
    return out.view(heads, pattern.num_rows, width).transpose(0, 1)


def headed_sddmm(pattern: CSRPattern, a: Tensor, b: Tensor) -> Tensor:
    r""":func:`sddmm` for ``H`` heads that share the pattern, node-major: :math:`z_{k,h} = \mathbf{a}_{r_k,h}^\top
    \mathbf{b}_{c_k,h}`.

    ``a [R, H, d]``, ``b [C, H, d]`` → ``[nnz, H]``; differentiable in both; the sums of one :func:`sddmm` per head,
    bit for bit (the compiled kernels, or :func:`stack_pattern`'s block product where they cannot run).
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"headed_sddmm: inputs must be [n, H, d] alike, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.size(0) != pattern.num_rows or b.size(0) != pattern.num_cols:
        raise ValueError(f"headed_sddmm: pattern [{pattern.num_rows}, {pattern.num_cols}], got left "
                         f"{tuple(a.shape)} and right {tuple(b.shape)}")
    heads, width = a.size(1), a.size(2)
    if _compiled_heads(pattern, a, b):
        return _SDDMM.apply(pattern, a, b, True)
    block = stack_pattern(pattern, heads)
    products = sddmm(block, a.transpose(0, 1).contiguous().view(-1, width),
                     b.transpose(0, 1).contiguous().view(-1, width))
    return products.view(heads, pattern.nnz).t()
