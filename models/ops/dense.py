r"""Dense row-wise ops: the layers' linear maps, :math:`\mathbf{Y} = \mathbf{X}\mathbf{W}^\top + \mathbf{b}`, with
the bits of ``torch.nn.functional.linear`` and the compiled products of :mod:`.native` where they apply; and
:func:`l2_normalize`, ``F.normalize`` over the last dimension with a one-pass backward; and
:func:`bpr_pair_scores`, a BPR batch's dot-product scores with one gradient buffer per table.

At Tiktok's full scale MMGCN runs 48 products of ``[112741, 64]`` by ``[64, 64]`` per training batch (forward and
input gradients) and 24 weight gradients ``[64, 112741]`` by ``[112741, 64]``, a large share of its work.
:func:`~.native.run_gemm` and :func:`~.native.run_gemm_tn` compute them summing each output element in MKL's own order
(one fused multiply-add chain over the depth, or, for the weight gradients, over each block of 192 rows, the blocks
then added in order), so results keep every bit. :func:`linear` uses them for the forward product and the gradients
of the input and the weight; the bias's gradient stays torch's sum, as torch's own backward computes it. Where a
compiled product does not apply (other devices, dtypes or shapes, the ``dense`` family switched off, or a machine
whose MKL sums differently: :func:`~.native.dense_products_status`) the same function runs torch's products, called
as torch's own backward calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .native import (
    GEMM_MAX_DEPTH,
    GEMM_MIN_ROWS,
    GEMM_TN_BLOCK,
    dense_products_status,
    gemm_tn_depth_fits,
    run_gemm,
    run_gemm_tn,
)

__all__ = ["RowSubset", "bpr_pair_scores", "l2_normalize", "linear", "rows_apply"]


@dataclass(frozen=True)
class RowSubset:
    """Rows ``index`` (sorted, distinct, int64) of an input with ``total`` rows: :func:`linear` with ``rows`` computes
    these rows of the full product, and the gradients the full product gets when nothing depends on its other rows
    (a training batch's receptive field, :mod:`.field`)."""

    index: Tensor
    total: int

    def block_offsets(self) -> Tensor:
        """``[B + 1]`` positions in ``index`` where the full product's blocks of 192 rows start (one block up to 192
        rows), then ``len(index)``: the blocks in which the weight gradient is summed (:func:`~.native.run_gemm_tn`)."""
        step = self.total if self.total <= GEMM_TN_BLOCK else GEMM_TN_BLOCK
        starts = torch.arange(0, self.total, step, device=self.index.device)
        offsets = torch.searchsorted(self.index, starts)
        return torch.cat([offsets, offsets.new_tensor([self.index.numel()])])


def rows_apply(weight: Tensor, total: int) -> bool:
    """Whether :func:`linear` can compute rows of a ``total``-row product with this ``[out, in]`` weight bit for bit
    as the full product: the compiled products run (:func:`~.native.dense_products_status`), on float32 CPU
    operands, with both widths multiples of 16 up to 192 and a depth the weight gradient's blocks reproduce."""
    out_features, in_features = weight.shape
    return (
        weight.dtype == torch.float32 and weight.device.type == "cpu"
        and all(0 < size <= GEMM_MAX_DEPTH and size % 16 == 0 for size in (out_features, in_features))
        and total >= GEMM_MIN_ROWS and gemm_tn_depth_fits(total) and dense_products_status() == "native"
    )


def _product(a: Tensor, b: Tensor, *, bias: Tensor | None = None, into: Tensor | None = None,
             rows: RowSubset | None = None) -> Tensor:
    """``a @ b`` (``+ bias``, or added into ``into`` in place), compiled where :func:`~.native.run_gemm` applies; with
    ``rows``, compiled or refused."""
    out = a.new_empty(a.size(0), b.size(1)) if into is None else into
    full_rows = None if rows is None else rows.total
    if run_gemm(a, b.contiguous(), out, bias=bias, accumulate=into is not None, full_rows=full_rows):
        return out
    if rows is not None:
        raise RuntimeError("linear: rows= needs the compiled products for these operands (see rows_apply)")
    if into is not None:
        return into.addmm_(a, b)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _column_major(matrix: Tensor) -> bool:
    return matrix.stride(0) == 1 and matrix.stride(1) == matrix.size(0)


def _input_gradient(grad: Tensor, x: Tensor, weight: Tensor, rows: RowSubset | None) -> Tensor:
    """``grad @ weight``, multiplied as torch's backward of ``x @ weight.t()`` multiplies it for this layout of ``x``
    (MKL's sums can depend on the orientation)."""
    if _column_major(x) and rows is None:
        return weight.t().mm(grad.t()).t()
    return _product(grad, weight, rows=rows)


def _weight_gradient(grad: Tensor, x: Tensor, weight: Tensor, rows: RowSubset | None) -> Tensor:
    """``grad^T x``, compiled where :func:`~.native.run_gemm_tn` applies (it has the sums of either orientation),
    else multiplied as torch's backward of ``x @ weight.t()`` multiplies it for this layout of ``weight``. With
    ``rows``, summed in the full product's blocks."""
    out = grad.new_empty(grad.size(1), x.size(1))
    if rows is not None:
        if not run_gemm_tn(grad.contiguous(), x.contiguous(), out, block_offsets=rows.block_offsets()):
            raise RuntimeError("linear: rows= needs the compiled products for these operands (see rows_apply)")
        return out
    if run_gemm_tn(grad, x, out):
        return out
    if _column_major(weight.t()):
        return grad.t().mm(x)
    return x.t().mm(grad).t()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, add: Tensor | None,
                rows: RowSubset | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.rows = bias is not None, rows
        if add is not None:
            ctx.mark_dirty(add)
        return _product(x, weight.t(), bias=bias, into=add, rows=rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        rows: RowSubset | None = ctx.rows
        x_grad = _input_gradient(grad, x, weight, rows) if ctx.needs_input_grad[0] else None
        weight_grad = _weight_gradient(grad, x, weight, rows) if ctx.needs_input_grad[1] else None
        bias_grad = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # torch's sum's order depends on the row count: sum the full product's gradient, zero outside the rows
            full = grad if rows is None else grad.new_zeros(rows.total, grad.size(1)).index_copy_(0, rows.index, grad)
            bias_grad = full.sum(0)
        add_grad = grad if ctx.needs_input_grad[3] else None
        return x_grad, weight_grad, bias_grad, add_grad, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, add: Tensor | None = None,
           rows: RowSubset | None = None) -> Tensor:
    r""":math:`\mathbf{X}\mathbf{W}^\top + \mathbf{b}`, or with ``add`` (and no bias) :math:`\mathbf{A} \mathrel{+}=
    \mathbf{X}\mathbf{W}^\top` in place, returning ``add``: the values and gradients of ``F.linear(x, weight, bias)``
    and of ``add.addmm_(x, weight.t())``, bit for bit.

    Args:
        x: ``[N, in]`` input (a column slice will do); other shapes go to ``F.linear`` (without ``add``).
        weight: ``[out, in]``, e.g. ``layer.weight`` or a slice of it.
        bias: ``[out]`` or ``None``.
        add: ``[N, out]`` tensor to accumulate into (e.g. the other half of a split concatenation's product).
        rows: ``x`` holds these rows of a larger input (row-major, as the full one must be): the result is those
            rows of the full product, and the gradients are the full product's when the rest of the computation
            reads no other row, bit for bit. Only where :func:`rows_apply` holds (else ``RuntimeError``).

    Shapes:
        - **output:** ``[N, out]``.
    """
    if add is not None and bias is not None:
        raise ValueError("linear: pass a bias or a tensor to add into, not both")
    if x.dim() != 2:
        if add is not None:
            raise ValueError(f"linear: add needs a 2-D input, got x of shape {tuple(x.shape)}")
        return F.linear(x, weight, bias)
    if rows is not None and rows.index.numel() != x.size(0):
        raise ValueError(f"linear: rows lists {rows.index.numel()} rows, x has {x.size(0)}")
    return _Linear.apply(x, weight, bias, add, rows)


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        # The same operations as F.normalize(x, dim=-1, eps=eps): the values are bit for bit F.normalize's.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        scale = norm.clamp_min(eps)
        out = x / scale
        ctx.save_for_backward(out, scale, norm >= eps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out, scale, unclamped = ctx.saved_tensors
        # d(x / |x|) = (g - y (g . y)) / |x|; where the norm was clamped at eps the scale is a constant.
        radial = torch.linalg.vecdot(grad, out, dim=-1).unsqueeze(-1).masked_fill_(~unclamped, 0.0)
        return torch.addcmul(grad, out, radial, value=-1.0).div_(scale), None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    r""":math:`\mathbf{x} / \max(\lVert \mathbf{x} \rVert_2, \epsilon)` over the last dimension: the values of
    ``F.normalize(x, dim=-1, eps=eps)``, bit for bit, with the backward :math:`(\mathbf{g} - \mathbf{y}(\mathbf{y}^\top
    \mathbf{g})) / \lVert\mathbf{x}\rVert` in one pass where autograd would differentiate the norm, the clamp and
    the division apart (GRCN and DisenGCN normalise wide tensors several times per step)."""
    return _Normalize.apply(x, eps)


class _BPRPairScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user: Tensor, item: Tensor, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        u, p, n = user[users], item[pos], item[neg]
        ctx.save_for_backward(u, p, n, users, pos, neg)
        ctx.user_shape, ctx.item_shape = user.shape, item.shape
        return (u * p).sum(-1), (u * n).sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pos: Tensor, grad_neg: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        u, p, n, users, pos, neg = ctx.saved_tensors
        grad_pos, grad_neg = grad_pos.unsqueeze(-1), grad_neg.unsqueeze(-1)
        grad_user = grad_item = None
        if ctx.needs_input_grad[0]:
            grad_user = _scatter_two(ctx.user_shape, users, grad_pos * p, users, grad_neg * n)
        if ctx.needs_input_grad[1]:
            grad_item = _scatter_two(ctx.item_shape, pos, grad_pos * u, neg, grad_neg * u)
        return grad_user, grad_item, None, None, None


def _scatter_two(shape: torch.Size, first_index: Tensor, first: Tensor, second_index: Tensor, second: Tensor) -> Tensor:
    """``zeros(shape)`` with the rows of ``first`` added at ``first_index`` and those of ``second`` at
    ``second_index``, summed in exactly the order autograd sums two separate gathers' gradients: each gather's rows
    in index order (``index_put_`` accumulates serially), then the two sums added. The second gather's rows are summed
    in a small buffer of its distinct rows, so only one table-sized buffer is filled."""
    out = first.new_zeros(shape).index_put_((first_index,), first, accumulate=True)
    rows, position = torch.unique(second_index, return_inverse=True)
    summed = second.new_zeros(rows.numel(), *shape[1:]).index_put_((position,), second, accumulate=True)
    return out.index_put_((rows,), summed, accumulate=True)


def bpr_pair_scores(user: Tensor, item: Tensor, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    r"""``[B]`` dot-product scores :math:`y_{ui}` and :math:`y_{uj}` of a BPR batch (Eq. 11), with the values and
    gradients of ``(user[users] * item[pos]).sum(-1)`` and ``(user[users] * item[neg]).sum(-1)`` bit for bit.

    Two separate gathers fill a zero gradient of ``user``'s and of ``item``'s full size each and add them; at Tiktok
    scale with GRCN's 256-d outputs that is about 0.4 GB of writes per batch. This fills one of each, and sums the
    rows in the order autograd sums the two gathers'. ``user`` is ``[U, d]``, ``item`` ``[I, d]``, the indices
    ``[B]``.
    """
    return _BPRPairScores.apply(user, item, users, pos, neg)
