"""The loss pieces every model shares (Eqs. 12-13 of the paper; docs/protocol.md, "Shared settings")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.functional import logsigmoid


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    """Mean Bayesian personalised ranking loss ``mean(-log sigma(y_ui - y_uj))`` (Eq. 12-13; Rendle et al. 2009)."""
    return -logsigmoid(pos_scores - neg_scores).mean()


def ego_l2(parameters: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """The shared regulariser: the sum over the given tensors of the mean of their squares (Eq. 13).

    Each tensor holds the batch's rows of one layer-0 parameter (users', positives' and negatives' ID embeddings,
    GRCN's user prototypes), so the penalty does not grow with the graph and is the same for every model.

    ``weights`` (one per tensor) gives ``sum_k w_k mean(p_k ** 2)`` instead, for a regulariser that weights the rows
    unequally (:data:`RELEASE_ID_WEIGHTS`). Without it the sum is computed exactly as before (no multiplication).
    """
    if not parameters:
        raise ValueError("ego_l2 needs at least one tensor")
    if weights is None:
        return torch.stack([p.pow(2).mean() for p in parameters]).sum()
    if len(weights) != len(parameters):
        raise ValueError(f"ego_l2 got {len(weights)} weights for {len(parameters)} tensors")
    return torch.stack([w * p.pow(2).mean() for w, p in zip(weights, parameters, strict=True)]).sum()


#: Weights of the users', positives' and negatives' ID rows in the released GRCN code's L2 term. The release
#: regularises ``mean(E[user_tensor] ** 2 + E[item_tensor] ** 2)`` where, per triplet (u, i, j), ``user_tensor`` holds
#: ``[u, u]`` and ``item_tensor`` holds ``[i, j]``: one mean over a ``[2B, d]`` tensor. Its sum of squares counts
#: ``e_u`` twice and ``e_i``, ``e_j`` once each, divided by ``2Bd``, so it equals
#: ``mean(e_u ** 2) + mean(e_i ** 2) / 2 + mean(e_j ** 2) / 2`` with every mean over the ``[B, d]`` batch rows: item
#: rows weigh half as much as in :func:`ego_l2`'s plain sum (``docs/protocol.md``).
RELEASE_ID_WEIGHTS = (1.0, 0.5, 0.5)


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
    scale with GRCN's 256-d outputs that is about 0.4 GB of writes per batch. This fills one of each. ``user`` is
    ``[U, d]``, ``item`` ``[I, d]``, the indices ``[B]``.
    """
    return _BPRPairScores.apply(user, item, users, pos, neg)
