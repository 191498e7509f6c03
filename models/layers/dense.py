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

import torch
import torch.nn.functional as F
from torch import Tensor

from .native import run_gemm, run_gemm_tn

__all__ = ["linear"]


def _product(a: Tensor, b: Tensor, *, bias: Tensor | None = None, into: Tensor | None = None) -> Tensor:
    """``a @ b`` (``+ bias``, or added into ``into`` in place), compiled where :func:`~.native.run_gemm` applies."""
    out = a.new_empty(a.size(0), b.size(1)) if into is None else into
    if run_gemm(a, b.contiguous(), out, bias=bias, accumulate=into is not None):
        return out
    if into is not None:
        return into.addmm_(a, b)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _column_major(matrix: Tensor) -> bool:
    return matrix.stride(0) == 1 and matrix.stride(1) == matrix.size(0)


def _input_gradient(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``grad @ weight``, multiplied as torch's backward of ``x @ weight.t()`` multiplies it for this layout of ``x``
    (MKL's sums can depend on the orientation)."""
    if _column_major(x):
        return weight.t().mm(grad.t()).t()
    return _product(grad, weight)


def _weight_gradient(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``grad^T x``, compiled where :func:`~.native.run_gemm_tn` applies (it has the sums of either orientation),
    else multiplied as torch's backward of ``x @ weight.t()`` multiplies it for this layout of ``weight``."""
    out = grad.new_empty(grad.size(1), x.size(1))
    if run_gemm_tn(grad, x, out):
        return out
    if _column_major(weight.t()):
        return grad.t().mm(x)
    return x.t().mm(grad).t()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, add: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if add is not None:
            ctx.mark_dirty(add)
        return _product(x, weight.t(), bias=bias, into=add)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        x_grad = _input_gradient(grad, x, weight) if ctx.needs_input_grad[0] else None
        weight_grad = _weight_gradient(grad, x, weight) if ctx.needs_input_grad[1] else None
        bias_grad = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        add_grad = grad if ctx.needs_input_grad[3] else None
        return x_grad, weight_grad, bias_grad, add_grad


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, add: Tensor | None = None) -> Tensor:
    r""":math:`\mathbf{X}\mathbf{W}^\top + \mathbf{b}`, or with ``add`` (and no bias) :math:`\mathbf{A} \mathrel{+}=
    \mathbf{X}\mathbf{W}^\top` in place, returning ``add``: the values and gradients of ``F.linear(x, weight, bias)``
    and of ``add.addmm_(x, weight.t())``, bit for bit.

    Args:
        x: ``[N, in]`` input (a column slice will do); other shapes go to ``F.linear`` (without ``add``).
        weight: ``[out, in]``, e.g. ``layer.weight`` or a slice of it.
        bias: ``[out]`` or ``None``.
        add: ``[N, out]`` tensor to accumulate into (e.g. the other half of a split concatenation's product).

    Shapes:
        - **output:** ``[N, out]``.
    """
    if add is not None and bias is not None:
        raise ValueError("linear: pass a bias or a tensor to add into, not both")
    if x.dim() != 2:
        if add is not None:
            raise ValueError(f"linear: add needs a 2-D input, got x of shape {tuple(x.shape)}")
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, add)
