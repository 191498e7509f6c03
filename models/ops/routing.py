r"""GRCN's routing step as one op: :func:`routing_step` computes

.. math::
    z_k = \mathbf{a}_{r_k}^\top \mathbf{b}_{c_k}, \qquad p = \operatorname{softmax}_{\text{row}}(z), \qquad
    \mathbf{y}_r = \sum_{k \in \mathrm{row}(r)} p_k \mathbf{b}_{c_k}

per channel (one iteration of Eqs. 2-3, :func:`~grcn_bench.models.layers.refine.route_prototypes`), and chooses how:
the compiled kernels' fused step (:func:`~.native.run_route_step`, one pass over each row forward and one backward)
where they run, else the three operations :func:`~.sparse.sddmm`, :func:`~.sparse.segment_softmax` and
:func:`~.sparse.spmm` one after the other. Both give the same values and gradients, bit for bit: the fused step's
first use compares it with the unfused operations on this machine (:func:`_routing_check`), and its autograd node
hands ``b`` its two gradients (the product's, then the sampled product's) as the three nodes would.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .native import ROUTE_MAX_WIDTH, register_check, route_step_status, run_route_step, run_route_step_backward
from .sparse import CSRPattern, sddmm, segment_softmax, spmm, stacked_rowptr, transposed_spmm

__all__ = ["routing_step"]


def _unfused(pattern: CSRPattern, a: Tensor, b: Tensor) -> Tensor:
    """The step as three differentiable operations, all channels at once (``a [M, R, d]``, ``b [M, C, d]``)."""
    logits = sddmm(pattern, a, b)  # [M, nnz]
    # Flattened, each (channel, row) segment is contiguous: one softmax over M * R segments.
    segments = stacked_rowptr(pattern.rowptr.long(), a.size(0))  # int64: M * nnz may pass 2**31
    p = segment_softmax(logits.view(-1), segments).view_as(logits)
    return spmm(pattern, p, b)


class _RoutingStep(torch.autograd.Function):
    """The fused step as one autograd node: the compiled forward pass and the row-local part of the backward pass.
    ``b`` comes twice, as the product's operand and as the sampled product's, so that its two gradients reach it in
    the order in which the unfused nodes' backward passes deliver them (the product's first): fused or not, the
    gradients are summed in the same order."""

    @staticmethod
    def forward(ctx, pattern: CSRPattern, a: Tensor, b_product: Tensor, b_sampled: Tensor) -> Tensor:
        channels, nnz = a.size(0), pattern.nnz
        logits, p, pulled = a.new_empty(channels, nnz), a.new_empty(channels, nnz), a.new_empty(a.shape)
        for m in range(channels):
            _ran(run_route_step(pattern.rowptr, pattern.col, a[m], b_product[m], logits[m], p[m], pulled[m]))
        ctx.pattern = pattern
        ctx.save_for_backward(a, b_product, p)
        return pulled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, Tensor, Tensor]:
        pattern: CSRPattern = ctx.pattern
        a, b, p = ctx.saved_tensors
        grad = grad.contiguous()
        grad_logits, grad_a = p.new_empty(p.shape), a.new_empty(a.shape)
        for m in range(a.size(0)):
            _ran(run_route_step_backward(pattern.rowptr, pattern.col, b[m], p[m], grad[m], grad_logits[m], grad_a[m]))
        # dL/db: the product's A^T (p) dL/dpulled, then the sampled product's A^T (dL/dlogits) a, as in their nodes.
        return None, grad_a, transposed_spmm(pattern, p, grad), transposed_spmm(pattern, grad_logits, a)


def _ran(ran: bool) -> None:
    if not ran:
        raise RuntimeError("the compiled routing step refused operands that routing_step accepted")


def _fused_fits(pattern: CSRPattern, a: Tensor, b: Tensor) -> bool:
    """Whether the compiled step takes these operands (float32 CPU, contiguous, int32 indices, a width that is a
    multiple of 8 up to :data:`~.native.ROUTE_MAX_WIDTH`) and runs on this machine."""
    return (
        a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype == torch.float32 and a.device.type == "cpu"
        and pattern.rowptr.dtype == torch.int32 and a.size(2) % 8 == 0 and 0 < a.size(2) <= ROUTE_MAX_WIDTH
        and route_step_status() == "native"
    )


def routing_step(pattern: CSRPattern, a: Tensor, b: Tensor) -> Tensor:
    """``spmm(pattern, p, b)`` with ``p`` the softmax over every row's entries (per channel) of ``sddmm(pattern, a,
    b)``, for channel-major ``a [M, R, d]`` and ``b [M, C, d]``; returns ``[M, R, d]``, differentiable in ``a`` and
    ``b``. Fused where the compiled kernels run, else the three operations (module docstring): the same result."""
    if not (a.dim() == 3 and b.dim() == 3 and a.size(0) == b.size(0) and a.size(1) == pattern.num_rows
            and b.size(1) == pattern.num_cols and a.size(2) == b.size(2)):
        raise ValueError(f"routing_step: pattern [{pattern.num_rows}, {pattern.num_cols}] needs a [M, R, d] and "
                         f"b [M, C, d], got {tuple(a.shape)} and {tuple(b.shape)}")
    if _fused_fits(pattern, a, b):
        return _RoutingStep.apply(pattern, a, b, b)
    return _unfused(pattern, a, b)


@register_check("routing")
def _routing_check() -> tuple[bool, str]:
    """Whether the fused step and its backward give the unfused operations' bits here: asked once, on a random
    pattern with empty rows, at widths 64 and 16. The unfused operations run on the other families' kernels."""
    generator = torch.Generator().manual_seed(0)
    for rows, cols, width in ((300, 200, 64), (97, 31, 16)):
        mask = torch.rand(rows, cols, generator=generator) < 0.1
        mask[::7] = False  # rows without entries
        row, column = mask.nonzero(as_tuple=True)
        pattern = CSRPattern.from_coo(row, column, rows, cols)
        a = torch.randn(rows, width, generator=generator) * 3
        b = torch.randn(cols, width, generator=generator)
        g = torch.randn(rows, width, generator=generator)
        logits, p, pulled = torch.empty(pattern.nnz), torch.empty(pattern.nnz), torch.empty(rows, width)
        grad, grad_a = torch.empty(pattern.nnz), torch.empty(rows, width)
        if not (run_route_step(pattern.rowptr, pattern.col, a, b, logits, p, pulled, checked=False)
                and run_route_step_backward(pattern.rowptr, pattern.col, b, p, g, grad, grad_a, checked=False)):
            return False, "MKL's vsExp not found in torch's library"
        with torch.enable_grad():  # the first call may come from a forward under no_grad (an evaluation)
            leaf = a.clone().requires_grad_()
            expected_logits = sddmm(pattern, leaf, b)
            expected_p = segment_softmax(expected_logits, pattern.rowptr.long())
            expected_pulled = spmm(pattern, expected_p, b)
            expected_grad, expected_grad_a = torch.autograd.grad(expected_pulled, (expected_logits, leaf), g)
        expected = (expected_logits, expected_p, expected_pulled, expected_grad, expected_grad_a)
        if not all(torch.equal(x.view(torch.int32), y.detach().view(torch.int32))
                   for x, y in zip((logits, p, pulled, grad, grad_a), expected, strict=True)):
            return False, f"its bits differ from the unfused operations' here (width {width})"
    return True, "native"
