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
(``torch.sparse.mm``) and sampled products (``torch.sparse.sampled_addmm``), on CPU several times cheaper than
gather, multiply and scatter at Tiktok scale (ENVIRONMENT.md). torch's own backward of a CSR product rebuilds the
transpose by sorting at every call; :class:`CSRPattern` carries the transpose's structure and the permutation that
maps its entries to the forward's (for :class:`~grcn_bench.datasets.base.InteractionGraph` the pattern is symmetric
and the permutation is ``reverse_edge``: no sorting at all).

Several channels at once: weights ``[nnz, M]`` with features ``[C, M, d]`` apply channel ``m``'s weights to channel
``m``'s features (GRCN's modalities). The ``M`` channels run as one product over the block-diagonal pattern of
:class:`ChannelPattern` (row ``r*M+m``, column ``c*M+m``), whose dense operands are the ``[C, M, d]`` tensors viewed as
``[C*M, d]``: a node's channels are adjacent in memory, which measured about 2x faster than one product per channel.

Shapes (``R`` rows, ``C`` columns, ``nnz`` stored entries, optional ``M`` channels):

- :func:`spmm`: ``values [nnz]`` with ``x [C, d]`` → ``[R, d]``; ``values [nnz, M]`` with ``x [C, M, d]`` →
  ``[R, M, d]``.
- :func:`sddmm`: ``a [R, d]``, ``b [C, d]`` → ``[nnz]``; ``a [R, M, d]``, ``b [C, M, d]`` → ``[nnz, M]``.

How another model can use them: a GAT- or DisenGCN-style layer over an ``InteractionGraph`` computes its per-edge
logits with ``sddmm(graph_pattern(graph), queries, keys)`` (or gathers them as it does now), normalises them with
``torch_geometric.utils.softmax(logits, ptr=graph.rowptr)``, and aggregates with ``spmm(graph_pattern(graph),
attention, x)`` instead of PyG's gather and scatter; heads or channels are the ``M`` dimension.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "CSRPattern", "ChannelPattern", "channel_pattern", "graph_pattern", "sddmm", "segment_softmax", "spmm",
    "user_item_pattern",
]


@dataclass(frozen=True)
class CSRPattern:
    """The sparsity pattern of an ``[R, C]`` matrix in CSR order, with the pattern of its transpose.

    Entry ``k`` sits in row ``r_k`` (rows are contiguous: ``rowptr``) and column ``col[k]``. The transpose's entries,
    in its own CSR order, are the forward's entries ``t_perm``: entry ``j`` of ``A^T`` holds ``values[t_perm[j]]``.
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

    def with_channels(self, channels: int) -> ChannelPattern:
        """The block pattern that runs ``channels`` copies of this one at once (build it once, use it many times)."""
        return ChannelPattern.build(self, channels)

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


@dataclass(frozen=True)
class ChannelPattern:
    """``M`` copies of a pattern, one per channel, as one block-diagonal ``[R*M, C*M]`` pattern.

    Entry ``k`` of channel ``m`` of the base pattern sits at row ``r_k*M+m``, column ``c_k*M+m`` of ``block``, so a
    ``[C, M, d]`` feature tensor is the block's ``[C*M, d]`` dense operand as it lies in memory. Values in the
    channels API are ``[nnz, M]`` (the base pattern's entry order); ``order`` and ``position`` translate between that
    layout, flattened, and the block's CSR order.

    Args:
        base: the pattern of one channel.
        channels: ``M``.
        block: the block-diagonal pattern, with its own transpose structure.
        order: ``[nnz*M]``: block entry ``j`` holds ``values.flatten()[order[j]]``.
        position: ``[nnz*M]``: the inverse permutation, ``values.flatten()[f]`` is block entry ``position[f]``.
    """

    base: CSRPattern
    channels: int
    block: CSRPattern
    order: Tensor
    position: Tensor

    @classmethod
    def build(cls, base: CSRPattern, channels: int) -> ChannelPattern:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        rowptr, col, entry, channel = _expand(base.rowptr, base.col, channels)
        order = entry * channels + channel
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=order.device)
        t_rowptr, t_col, t_entry, t_channel = _expand(base.t_rowptr, base.t_col, channels)
        # Block transpose entry (j, m) holds forward entry (t_perm[j], m), wherever the block put that one.
        t_perm = position.index_select(0, base.t_perm.index_select(0, t_entry) * channels + t_channel)
        rows, cols, nnz = base.num_rows * channels, base.num_cols * channels, order.numel()
        block = CSRPattern(
            rowptr=_compact(rowptr, nnz),
            col=_compact(col, cols),
            t_rowptr=_compact(t_rowptr, nnz),
            t_col=_compact(t_col, rows),
            t_perm=t_perm,
            num_rows=rows,
            num_cols=cols,
        )
        return cls(base, channels, block, order, position)


def _expand(rowptr: Tensor, col: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block CSR ``(rowptr, col)`` of ``channels`` copies of a pattern, and for every block entry, in block order, the
    base entry ``k`` and channel ``m`` it copies (all int64). Gathers only: this runs at every forward."""
    rowptr, col = rowptr.long(), col.long()
    device, nnz = col.device, col.numel()
    # Block row r*M+m holds row r's entries again: its degree is row r's.
    block_degree = (rowptr[1:] - rowptr[:-1]).repeat_interleave(channels)
    block_rowptr = torch.zeros(block_degree.numel() + 1, dtype=torch.long, device=device)
    torch.cumsum(block_degree, 0, out=block_rowptr[1:])
    block_row = torch.repeat_interleave(
        torch.arange(block_degree.numel(), device=device), block_degree, output_size=nnz * channels
    )
    offset = torch.arange(nnz * channels, device=device) - block_rowptr.index_select(0, block_row)
    row = torch.div(block_row, channels, rounding_mode="floor")
    channel = block_row - row * channels
    entry = rowptr.index_select(0, row) + offset
    return block_rowptr, col.index_select(0, entry) * channels + channel, entry, channel


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


def channel_pattern(graph, kind: str, channels: int) -> ChannelPattern:
    """``graph_pattern(graph)`` (``kind="graph"``) or ``user_item_pattern(graph)`` (``kind="user_item"``) expanded to
    ``channels`` channels, built on the first call for a graph and then kept in ``graph.derived``: the expansion
    costs a few hundred milliseconds at Tiktok scale, and the structure it describes never changes."""
    builders = {"graph": graph_pattern, "user_item": user_item_pattern}
    if kind not in builders:
        raise ValueError(f"unknown pattern kind {kind!r}; expected one of {sorted(builders)}")
    key = ("channel_pattern", kind, channels)
    pattern = graph.derived.get(key)
    if pattern is None:
        pattern = graph.derived[key] = builders[kind](graph).with_channels(channels)
    return pattern


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
        return torch.sparse_csr_tensor(rowptr, col, values, size, check_invariants=False)


def _spmm_raw(rowptr: Tensor, col: Tensor, values: Tensor, x: Tensor, num_rows: int) -> Tensor:
    """``[R, d]``: one CSR sparse-dense product, written straight into its output (``torch.sparse.mm`` adds a zero
    fill and a full copy of the result). MKL's product never reads the output when ``beta=0`` (a test checks it), so
    on that path the output needs no zero fill."""
    if _mkl_product(x, rowptr):
        out = x.new_empty(num_rows, x.size(1))
    else:
        out = x.new_zeros(num_rows, x.size(1))
    matrix = _csr(rowptr, col, values.contiguous(), (num_rows, x.size(0)))
    return torch.addmm(out, matrix, x.contiguous(), beta=0.0, out=out)


def _mkl_product(x: Tensor, rowptr: Tensor) -> bool:
    """Whether torch runs a CSR product with MKL (CPU, float32/64, int32 indices), which ignores the output's values
    when ``beta=0``."""
    return (
        x.device.type == "cpu"
        and torch.backends.mkl.is_available()
        and x.dtype in (torch.float32, torch.float64)
        and rowptr.dtype == torch.int32
    )


def _sddmm_raw(rowptr: Tensor, col: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``[nnz]``: ``a[r_k] . b[col_k]`` per entry without gathering rows, written into the values of a CSR matrix
    (without ``out`` the kernel clones its input's values and indices first)."""
    out = _csr(rowptr, col, a.new_zeros(col.numel()), (a.size(0), b.size(0)))  # zeros: beta=0 still reads them
    torch.sparse.sampled_addmm(out, a.contiguous(), b.contiguous().t(), beta=0.0, out=out)
    return out.values()


# ---------------------------------------------------------------------------------------------- autograd functions


class _SpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pattern: CSRPattern, values: Tensor, x: Tensor) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(values, x)
        return _spmm_raw(pattern.rowptr, pattern.col, values, x, pattern.num_rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        pattern: CSRPattern = ctx.pattern
        values, x = ctx.saved_tensors
        grad_values = grad_x = None
        if ctx.needs_input_grad[1]:  # dL/dw_k = dL/dy[r_k] . x[col_k]
            grad_values = _sddmm_raw(pattern.rowptr, pattern.col, grad, x)
        if ctx.needs_input_grad[2]:  # dL/dX = A^T dL/dY; A^T's values are the forward's, permuted by t_perm
            transposed = values.index_select(0, pattern.t_perm)
            grad_x = _spmm_raw(pattern.t_rowptr, pattern.t_col, transposed, grad, pattern.num_cols)
        return None, grad_values, grad_x


class _SDDMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pattern: CSRPattern, a: Tensor, b: Tensor) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(a, b)
        return _sddmm_raw(pattern.rowptr, pattern.col, a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        pattern: CSRPattern = ctx.pattern
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[1]:  # dL/da_r = sum over row r of dL/dz_k b[col_k]
            grad_a = _spmm_raw(pattern.rowptr, pattern.col, grad, b, pattern.num_rows)
        if ctx.needs_input_grad[2]:  # dL/db_c = sum over column c of dL/dz_k a[r_k]
            transposed = grad.index_select(0, pattern.t_perm)
            grad_b = _spmm_raw(pattern.t_rowptr, pattern.t_col, transposed, a, pattern.num_cols)
        return None, grad_a, grad_b


class _SegmentSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src: Tensor, ptr: Tensor) -> Tensor:
        # The same operations as torch_geometric.utils.softmax(src, ptr=ptr), so the values are bit for bit PyG's.
        count = ptr[1:] - ptr[:-1]
        size = src.size(0)
        src_max = torch.segment_reduce(src, "max", offsets=ptr, axis=0)
        src_max = torch.where(src_max.isinf(), 0, src_max)  # empty segments; they have no entry to shift
        out = (src - src_max.repeat_interleave(count, dim=0, output_size=size)).exp_()
        out_sum = torch.segment_reduce(out, "sum", offsets=ptr, axis=0) + 1e-16
        out.div_(out_sum.repeat_interleave(count, dim=0, output_size=size))
        ctx.save_for_backward(out, ptr, count)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out, ptr, count = ctx.saved_tensors
        # d softmax: p * (g - sum_segment(p * g)), one pass instead of autograd's trip through every forward step.
        dot = torch.segment_reduce(out * grad, "sum", offsets=ptr, axis=0)
        return (grad - dot.repeat_interleave(count, dim=0, output_size=out.size(0))).mul_(out), None


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



def spmm(pattern: CSRPattern | ChannelPattern, values: Tensor, x: Tensor) -> Tensor:
    r"""Weighted sum over each row's entries: :math:`\mathbf{y}_r = \sum_{k \in \mathrm{row}(r)} w_k
    \mathbf{x}_{c_k}`, per channel when ``values`` is ``[nnz, M]`` and ``x`` is ``[C, M, d]``.

    Differentiable in ``values`` and ``x``; returns ``[R, d]`` or ``[R, M, d]``. For channels, pass a
    :class:`ChannelPattern` built once (a plain pattern is expanded at every call).
    """
    base = pattern.base if isinstance(pattern, ChannelPattern) else pattern
    if values.size(0) != base.nnz or x.size(0) != base.num_cols:
        raise ValueError(
            f"spmm: pattern [{base.num_rows}, {base.num_cols}] with {base.nnz} entries, got values "
            f"{tuple(values.shape)} and features {tuple(x.shape)}"
        )
    if values.dim() == 1 and x.dim() == 2 and not isinstance(pattern, ChannelPattern):
        return _SpMM.apply(base, values, x)
    if not (values.dim() == 2 and x.dim() == 3 and x.size(1) == values.size(1)):
        raise ValueError(
            f"spmm: values [nnz] need features [C, d] and a plain pattern, values [nnz, M] need [C, M, d]; got "
            f"{tuple(values.shape)} and {tuple(x.shape)}"
        )
    channels = _channel_pattern(pattern, values.size(1))
    block_values = values.reshape(-1).index_select(0, channels.order)
    out = _SpMM.apply(channels.block, block_values, x.reshape(-1, x.size(2)))
    return out.view(base.num_rows, channels.channels, x.size(2))


def sddmm(pattern: CSRPattern | ChannelPattern, a: Tensor, b: Tensor) -> Tensor:
    r"""One dot product per stored entry, :math:`z_k = \mathbf{a}_{r_k}^\top \mathbf{b}_{c_k}`, per channel for
    ``[R, M, d]`` and ``[C, M, d]`` inputs. Differentiable in ``a`` and ``b``; returns ``[nnz]`` or ``[nnz, M]``."""
    base = pattern.base if isinstance(pattern, ChannelPattern) else pattern
    if a.size(0) != base.num_rows or b.size(0) != base.num_cols or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"sddmm: pattern [{base.num_rows}, {base.num_cols}], got left {tuple(a.shape)} and right "
            f"{tuple(b.shape)}"
        )
    if a.dim() == 2 and not isinstance(pattern, ChannelPattern):
        return _SDDMM.apply(base, a, b)
    if a.dim() != 3:
        raise ValueError(f"sddmm: inputs must be [n, d] (plain pattern) or [n, M, d], got {tuple(a.shape)}")
    channels = _channel_pattern(pattern, a.size(1))
    width = a.size(2)
    z = _SDDMM.apply(channels.block, a.reshape(-1, width), b.reshape(-1, width))
    return z.index_select(0, channels.position).view(base.nnz, channels.channels)


def _channel_pattern(pattern: CSRPattern | ChannelPattern, channels: int) -> ChannelPattern:
    if isinstance(pattern, CSRPattern):
        return pattern.with_channels(channels)
    if pattern.channels != channels:
        raise ValueError(f"the channel pattern has {pattern.channels} channels, the inputs have {channels}")
    return pattern
