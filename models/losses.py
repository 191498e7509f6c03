"""The loss pieces every model shares (SPEC §2.1, Eq. 12-13 of the paper)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    """Mean Bayesian personalised ranking loss ``mean(-log sigma(y_ui - y_uj))`` (Eq. 12-13; Rendle et al. 2009)."""
    return -logsigmoid(pos_scores - neg_scores).mean()


def ego_l2(parameters: Sequence[Tensor]) -> Tensor:
    """The shared regulariser: the sum over the given tensors of the mean of their squares (Eq. 13, SPEC §2.2.7).

    Each tensor holds the batch's rows of one layer-0 parameter (users', positives' and negatives' ID embeddings,
    GRCN's user prototypes), so the penalty does not grow with the graph and is the same for every model.
    """
    if not parameters:
        raise ValueError("ego_l2 needs at least one tensor")
    return torch.stack([p.pow(2).mean() for p in parameters]).sum()
