"""Uniform negative sampling for BPR triplets (Eq. 12; docs/protocol.md, "Training").

For each requested user, one item drawn uniformly from the items that are *not* among that user's training items.
Vectorised rejection sampling with a seeded ``torch.Generator``: draw uniform items for every position, test
membership with one ``searchsorted`` over sorted ``user * I + item`` keys, redraw only the rejected positions.
Positions still rejected after a few rounds (users who own most of the catalogue) are finished by exact inversion:
the ``r``-th item a user does not own, for ``r`` uniform, is found with one more ``searchsorted``. Both steps draw
uniformly from the same set, so the result is exactly uniform, and the running time is bounded however dense a user.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["NegativeSampler", "sample_negatives"]


class NegativeSampler:
    """Index structures for :func:`sample_negatives`, built once per training set.

    Args:
        indptr: ``[U+1]`` CSR row pointer of each user's training items.
        items: ``[E]`` training items, sorted within each user (``RecDataset.user_items("train")``).
        num_items: catalogue size ``I``.
        rejection_rounds: rounds of rejection before the exact inversion finishes the remaining positions.
    """

    def __init__(self, indptr: np.ndarray | Tensor, items: np.ndarray | Tensor, num_items: int,
                 rejection_rounds: int = 4):
        self.indptr = torch.as_tensor(indptr, dtype=torch.long)
        self.items = torch.as_tensor(items, dtype=torch.long)
        self.num_items = int(num_items)
        self.rejection_rounds = rejection_rounds
        self.num_users = self.indptr.numel() - 1
        self.degree = self.indptr[1:] - self.indptr[:-1]
        owner = torch.repeat_interleave(torch.arange(self.num_users), self.degree)
        # Sorted because items are sorted within each user and users are in order.
        self.keys = owner * self.num_items + self.items
        # For the t-th owned item m_t of a user, m_t - t counts the non-owned items below it (non-decreasing).
        rank_in_user = torch.arange(self.items.numel()) - self.indptr[owner]
        self.gap_keys = owner * self.num_items + (self.items - rank_in_user)

    def __call__(self, users: Tensor, generator: torch.Generator) -> Tensor:
        users = torch.as_tensor(users, dtype=torch.long)
        if users.numel() == 0:
            return torch.empty(0, dtype=torch.long)
        if int(users.min()) < 0 or int(users.max()) >= self.num_users:
            raise ValueError(f"user ids must lie in 0..{self.num_users - 1}")
        full = self.degree[users] >= self.num_items
        if bool(full.any()):
            user = int(users[full][0])
            raise ValueError(f"user {user} has every one of the {self.num_items} items in training: no negative exists")
        negatives = torch.randint(self.num_items, users.shape, generator=generator)
        pending = torch.arange(users.numel())
        for _ in range(self.rejection_rounds):
            pending = pending[self._owned(users[pending], negatives[pending])]
            if pending.numel() == 0:
                return negatives
            negatives[pending] = torch.randint(self.num_items, pending.shape, generator=generator)
        pending = pending[self._owned(users[pending], negatives[pending])]
        if pending.numel():
            negatives[pending] = self._invert(users[pending], generator)
        return negatives

    def _owned(self, users: Tensor, items: Tensor) -> Tensor:
        if self.keys.numel() == 0:
            return torch.zeros(users.shape, dtype=torch.bool)
        query = users * self.num_items + items
        position = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        return self.keys[position] == query

    def _invert(self, users: Tensor, generator: torch.Generator) -> Tensor:
        """Exactly uniform over each user's non-owned items: the ``r``-th free item is ``r + #{t : m_t - t <= r}``."""
        free = (self.num_items - self.degree[users]).to(torch.float64)
        rank = (torch.rand(users.shape, generator=generator, dtype=torch.float64) * free).long()
        rank = torch.minimum(rank, free.long() - 1)  # guards the float rounding of u * free up to free
        below = torch.searchsorted(self.gap_keys, users * self.num_items + rank, right=True) - self.indptr[users]
        return rank + below


def sample_negatives(
    indptr: np.ndarray | Tensor,
    items: np.ndarray | Tensor,
    users: Tensor,
    num_items: int,
    generator: torch.Generator,
) -> Tensor:
    """One uniform negative item per entry of ``users`` (``[B]`` int64), never one of that user's training items.

    Builds a :class:`NegativeSampler` on every call; a training loop that samples every batch should build one
    sampler per training set and call it instead (the draws are identical).

    Args:
        indptr: ``[U+1]`` CSR row pointer of each user's training items.
        items: training items sorted within each user (``RecDataset.user_items("train")``).
        users: ``[B]`` user ids.
        num_items: catalogue size ``I``.
        generator: the seeded ``torch.Generator`` every random draw comes from.

    Raises:
        ValueError: a requested user owns every item (no negative exists), or a user id is out of range.
    """
    return NegativeSampler(indptr, items, num_items)(users, generator)
