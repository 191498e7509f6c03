r"""Top-K ranking metrics per user, vectorised over a batch of users (docs/protocol.md, "Metrics").

The pipeline is three small steps, each a pure function, so that the evaluator (and a faster scoring path later) can
swap any of them:

1. :func:`top_k` picks the ``K_max`` best items per row of a score block ``[B, I]``;
2. :func:`hits_from_csr` / :func:`hits_from_mask` mark which of them are held-out positives (``[B, K_max]`` bool);
3. :func:`rank_metrics` turns the hit matrix and the number of positives per user into Precision, Recall and NDCG for
   every requested K at once.

For a user with held-out positives :math:`P` and top-K list :math:`L` (ranks :math:`r` are 0-based):

.. math::
    \mathrm{hits} = |P \cap L|, \quad
    \mathrm{Precision@K} = \frac{\mathrm{hits}}{K}, \quad
    \mathrm{Recall@K} = \frac{\mathrm{hits}}{|P|}, \quad
    \mathrm{NDCG@K} = \frac{\sum_{r:\, L_r \in P} 1/\log_2(r+2)}{\sum_{r=0}^{n-1} 1/\log_2(r+2)}

with :math:`n = \min(|P|, K)` for the standard NDCG and :math:`n = \min(\mathrm{hits}, K)` for the
released GRCN code's variant (``ndcg="official"``, docs/protocol.md, "The released code's protocol"), under which a
single hit at rank 0 scores 1.0 whatever :math:`|P|` is. Both give 0 when there is no hit.

Ties: :func:`top_k` uses :func:`torch.topk`, whose order among equal scores is implementation-defined (on CPU it is
*not* lowest-id-first). It depends only on the row's own scores, so results do not depend on how users are batched;
ties between a positive and a non-positive at the K boundary are the only ties that change a metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Metric families in canonical order.
METRICS = ("precision", "recall", "ndcg")
#: NDCG normalisations: "standard" (IDCG over min(|P|, K) positions) or "official" (min(hits, K)).
NDCG_VARIANTS = ("standard", "official")


def normalize_ks(ks: int | Sequence[int]) -> tuple[int, ...]:
    """The cut-offs as a sorted tuple of distinct positive ints (the canonical order of every result)."""
    if isinstance(ks, int):
        ks = (ks,)
    values = tuple(ks)
    if not values:
        raise ValueError("ks is empty; expected at least one cut-off K")
    for k in values:
        # bool is an int subclass; True would silently mean K = 1.
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"every K must be a positive int, got {k!r} in {values!r}")
    return tuple(sorted(set(values)))


def metric_names(ks: int | Sequence[int], metrics: Sequence[str] = METRICS) -> list[str]:
    """Metric names in canonical order: by increasing K, then precision, recall, ndcg (``"recall@10"``)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected some of {METRICS}")
    return [f"{m}@{k}" for k in normalize_ks(ks) for m in METRICS if m in metrics]


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(values, items)``, each ``[B, min(k, I)]``: the best items of every row, best first.

    Ties are broken by :func:`torch.topk` (see the module docstring).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [B, I] matrix, got shape {tuple(scores.shape)}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    values, items = torch.topk(scores, min(k, scores.size(1)), dim=1, largest=True, sorted=True)
    return values, items


def hits_from_csr(top_items: Tensor, indptr: Tensor, positives: Tensor, num_items: int) -> Tensor:
    """``[B, k]`` bool: whether each listed item is one of its row's positives.

    Args:
        top_items: ``[B, k]`` item ids per row (from :func:`top_k`).
        indptr: ``[B+1]`` batch-local CSR row pointer of the positives.
        positives: ``[nnz]`` positive item ids, row by row.
        num_items: the item count I (ids are in ``0..I-1``).
    """
    num_rows = top_items.size(0)
    if indptr.numel() != num_rows + 1:
        raise ValueError(f"indptr has {indptr.numel()} entries for {num_rows} rows (expected {num_rows + 1})")
    if positives.numel() == 0:
        return torch.zeros_like(top_items, dtype=torch.bool)
    counts = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(num_rows, device=indptr.device), counts)
    # One sorted key per (row, item): membership of every listed item is one searchsorted, no per-row loop.
    keys, _ = torch.sort(rows * num_items + positives)
    query = torch.arange(num_rows, device=top_items.device).unsqueeze(1) * num_items + top_items
    where = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
    return keys[where] == query


def hits_from_mask(top_items: Tensor, positive_mask: Tensor) -> Tensor:
    """``[B, k]`` bool from a dense ``[B, I]`` bool mask of positives."""
    if positive_mask.dtype != torch.bool or positive_mask.dim() != 2 or positive_mask.size(0) != top_items.size(0):
        raise ValueError(
            f"positive_mask must be a bool [B, I] matrix with B = {top_items.size(0)}, "
            f"got {positive_mask.dtype} {tuple(positive_mask.shape)}"
        )
    return torch.gather(positive_mask, 1, top_items)


def topk_hits(scores: Tensor, positives: Tensor | tuple[Tensor, Tensor], kmax: int) -> tuple[Tensor, Tensor]:
    """Hit matrix ``[B, kmax]`` and number of positives ``[B]`` of a score block.

    ``positives`` is a bool mask ``[B, I]`` or a batch-local CSR ``(indptr [B+1], items [nnz])``. When there are
    fewer than ``kmax`` items the hit matrix is padded with ``False`` (those list positions are empty).
    """
    _, items = top_k(scores, kmax)
    if isinstance(positives, Tensor):
        hits = hits_from_mask(items, positives)
        num_positives = positives.sum(1)
    else:
        indptr, pos_items = positives
        hits = hits_from_csr(items, indptr, pos_items, scores.size(1))
        num_positives = indptr[1:] - indptr[:-1]
    return pad_hits(hits, kmax), num_positives


def pad_hits(hits: Tensor, kmax: int) -> Tensor:
    """Pad a ``[B, k]`` hit matrix with ``False`` up to ``kmax`` columns (a catalogue smaller than ``kmax``)."""
    if hits.size(1) >= kmax:
        return hits
    return torch.nn.functional.pad(hits, (0, kmax - hits.size(1)), value=False)


def discounts(kmax: int, *, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Tensor:
    """``[kmax]`` position discounts ``1 / log2(r + 2)`` for 0-based ranks ``r``."""
    return 1.0 / torch.log2(torch.arange(kmax, dtype=dtype, device=device) + 2.0)


def rank_metrics(
    hits: Tensor, num_positives: Tensor, ks: int | Sequence[int], *, ndcg: str = "standard"
) -> dict[str, Tensor]:
    """Precision, Recall and NDCG at every K, per row, as float64 ``[B]`` tensors keyed like ``"ndcg@10"``.

    Args:
        hits: ``[B, K_max]`` bool, ``hits[b, r]`` = the item at rank ``r`` of row ``b`` is a positive.
        num_positives: ``[B]`` size of each row's positive set :math:`|P|`.
        ks: the cut-offs; each must be ``<= K_max``.
        ndcg: ``"standard"`` or ``"official"`` (the released code's IDCG).

    Rows without positives get 0 for every metric (the evaluator skips such users before this point).
    Keys follow :func:`metric_names`.
    """
    if ndcg not in NDCG_VARIANTS:
        raise ValueError(f"unknown ndcg variant {ndcg!r}; expected one of {NDCG_VARIANTS}")
    if hits.dtype != torch.bool or hits.dim() != 2:
        raise ValueError(f"hits must be a bool [B, K_max] matrix, got {hits.dtype} {tuple(hits.shape)}")
    ks = normalize_ks(ks)
    num_rows, kmax = hits.shape
    if ks[-1] > kmax:
        raise ValueError(f"K = {ks[-1]} exceeds the {kmax} ranked positions in hits")
    if num_positives.shape != (num_rows,):
        raise ValueError(f"num_positives must have shape ({num_rows},), got {tuple(num_positives.shape)}")
    num_positives = num_positives.to(device=hits.device, dtype=torch.float64)
    hit_count = hits.to(torch.float64).cumsum(1)  # [B, K_max]: hits within the first r+1 positions
    if bool((hit_count[:, -1] > num_positives).any()):
        raise ValueError("a row has more hits than positives; hits and num_positives disagree")

    discount = discounts(kmax, device=hits.device)
    dcg = (hits.to(torch.float64) * discount).cumsum(1)
    # ideal[n] = DCG of n hits at the top ranks (ideal[0] = 0).
    ideal = torch.cat([discount.new_zeros(1), discount.cumsum(0)])
    out: dict[str, Tensor] = {}
    for k in ks:
        hits_k = hit_count[:, k - 1]
        if ndcg == "standard":
            ideal_positions = num_positives.clamp(max=k)  # min(|P|, K)
        else:
            ideal_positions = hits_k  # the released code's: min(hits, K); hits <= K already
        idcg = ideal[ideal_positions.long()]
        out[f"precision@{k}"] = hits_k / k
        out[f"recall@{k}"] = torch.where(num_positives > 0, hits_k / num_positives.clamp(min=1.0), 0.0)
        out[f"ndcg@{k}"] = torch.where(idcg > 0, dcg[:, k - 1] / idcg.clamp(min=1e-300), 0.0)
    return {name: out[name] for name in metric_names(ks)}
