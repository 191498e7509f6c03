r"""The layers' linear maps, :math:`\mathbf{Y} = \mathbf{X}\mathbf{W}^\top + \mathbf{b}`, with the bits of
``torch.nn.functional.linear`` and the compiled products of :mod:`.native` where they apply.

At Tiktok's full scale MMGCN runs 48 products of ``[112741, 64]`` by ``[64, 64]`` per training batch (forward and
input gradients) and 24 weight gradients ``[64, 112741]`` by ``[112741, 64]``, about half of its time. On this
project's 2-core AMD EPYC machines :func:`~.native.run_gemm` and :func:`~.native.run_gemm_tn` compute them about
1.3-1.4x as fast as MKL, summing each output element in MKL's own order (one fused multiply-add chain over the depth,
or, for the weight gradients, over each block of 192 rows, the blocks then added in order), so results keep every
bit. :func:`linear` uses them for the forward product and the gradients of the input and the weight; the bias's
gradient stays torch's sum, as torch's own backward computes it. Where a compiled product does not apply (other
devices, dtypes or shapes, or a machine whose MKL sums differently: :func:`~.native.dense_products_status`) the same
function runs torch's products, called as torch's own backward calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .native import (
    GEMM_MAX_DEPTH,
    GEMM_MIN_ROWS,
    GEMM_TN_BLOCK,
    dense_products_status,
    gemm_tn_depth_fits,
    run_gemm,
    run_gemm_tn,
)

__all__ = ["RowSubset", "linear", "rows_apply"]


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
