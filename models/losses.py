"""The loss pieces every model shares (Eqs. 12-13 of the paper; docs/protocol.md, "Shared settings")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
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
