r"""Top-K ranking metrics per user, vectorised over a batch of users (docs/protocol.md, "Metrics").

The pipeline is three small steps, each a pure function, so that the evaluator (and a faster scoring path later) can
swap any of them:

1. :func:`top_k` picks the ``K_max`` best items per row of a score block ``[B, I]``;
2. :func:`hits_from_csr` / :func:`hits_from_mask` mark which of them are held-out positives (``[B, K_max]`` bool);
3. :func:`rank_metrics` turns the hit matrix and the number of positives per user into every registered metric
   (Precision, Recall and NDCG, and any other) for every requested K at once.

Metrics live in a registry: ``@register_metric("name")`` on a function ``(ranked: RankedLists, k) -> [B]`` float64
tensor adds one, and the evaluator, the stored results and the report's tables carry it with no other change
(docs/extending.md, "A metric"). :class:`RankedLists` holds the hit matrix, the number of positives, and the
cumulative hit counts and DCG computed once for every metric and K.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

#: NDCG normalisations: "standard" (IDCG over min(|P|, K) positions) or "official" (min(hits, K)).
NDCG_VARIANTS = ("standard", "official")


# ---------------------------------------------------------------------------------------------------------------
# The registry


@dataclass
class RankedLists:
    """What every metric sees of a batch of ranked lists, with the running sums computed once for all of them.

    Attributes:
        hits: ``[B, K_max]`` bool, ``hits[b, r]`` = the item at rank ``r`` (0-based) of row ``b`` is a positive.
        num_positives: ``[B]`` float64, each row's number of held-out positives :math:`|P|`.
        ndcg: the NDCG normalisation, ``"standard"`` or ``"official"`` (:data:`NDCG_VARIANTS`).
    """

    hits: Tensor
    num_positives: Tensor
    ndcg: str = "standard"

    @cached_property
    def hit_count(self) -> Tensor:
        """``[B, K_max]`` float64: hits within the first ``r + 1`` positions."""
        return self.hits.to(torch.float64).cumsum(1)

    def hits_at(self, k: int) -> Tensor:
        """``[B]`` float64: hits in the top ``k``."""
        return self.hit_count[:, k - 1]

    @cached_property
    def discount(self) -> Tensor:
        """``[K_max]`` position discounts ``1 / log2(r + 2)``."""
        return discounts(self.hits.size(1), device=self.hits.device)

    @cached_property
    def dcg(self) -> Tensor:
        """``[B, K_max]`` float64: DCG of the first ``r + 1`` positions."""
        return (self.hits.to(torch.float64) * self.discount).cumsum(1)

    @cached_property
    def ideal(self) -> Tensor:
        """``[K_max + 1]`` float64: ``ideal[n]`` = DCG of ``n`` hits at the top ranks (``ideal[0] = 0``)."""
        return torch.cat([self.discount.new_zeros(1), self.discount.cumsum(0)])


#: ``metric(ranked, k) -> [B]`` float64: one value per row at cut-off ``k`` (``k <= K_max``).
MetricFunction = Callable[[RankedLists, int], Tensor]


@dataclass(frozen=True)
class Metric:
    """A registered metric family: ``compute(ranked, k)``, its titles in tables, and its place in the order."""

    name: str
    compute: MetricFunction
    title: str
    short: str
    order: int
    report: bool = True


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, *, title: str | None = None, short: str | None = None, order: int = 100,
                    report: bool = True) -> Callable[[MetricFunction], MetricFunction]:
    """Decorator that registers ``metric(ranked: RankedLists, k: int) -> Tensor`` (float64 ``[B]``) as ``name``.

    Every evaluation then computes ``<name>@<K>`` for each cut-off, so it is stored with every result (validation
    and test, per user) and shown in the report's tables (Tables 2 and 3, the audit) with ``title`` as its column
    (default: ``name``) and ``short`` in compact labels (default: ``title``; shown as ``<short>@10``).

    Args:
        name: the family's name: a lowercase word without ``@`` (keys are ``"<name>@<K>"``).
        order: place in the canonical order (lowest first; equal orders keep registration order). The built-in
            metrics take 10 (precision), 20 (recall) and 30 (NDCG); the default is 100, after them.
        report: show it in the report's tables (it is computed and stored either way).

    Raises:
        ValueError: ``name`` is malformed, or already registered to another function.
    """
    if not name or "@" in name or name != name.strip() or name.startswith(("val_", "test_")):
        raise ValueError(f"@register_metric({name!r}): a metric name is a word without '@' (keys are name@K)")

    def decorate(compute: MetricFunction) -> MetricFunction:
        if not callable(compute):
            raise TypeError(f"@register_metric({name!r}) decorates a function (ranked, k) -> Tensor, got {compute!r}")
        entry = Metric(name, compute, title or name, short or title or name, order, report)
        if name in _METRICS and _METRICS[name] != entry:
            raise ValueError(f"a metric named {name!r} is already registered "
                             f"({getattr(_METRICS[name].compute, '__qualname__', _METRICS[name].compute)})")
        _METRICS[name] = entry
        return compute

    return decorate


def unregister_metric(name: str) -> None:
    """Remove a metric from the registry (for tests that register throwaway metrics)."""
    _METRICS.pop(name, None)


def available_metrics() -> tuple[str, ...]:
    """Registered metric families in canonical order (by ``order``, then registration)."""
    return tuple(m.name for m in sorted(_METRICS.values(), key=lambda m: m.order))


def reported_metrics(k: int = 10) -> tuple[str, ...]:
    """The keys at ``k`` of the families shown in the report's tables, in canonical order (``"recall@10"``)."""
    return tuple(f"{name}@{k}" for name in available_metrics() if _METRICS[name].report)


def get_metric(name: str) -> Metric:
    """The registered family ``name`` (``"recall"``) or the family of a key (``"recall@10"``).

    Raises:
        KeyError: unknown family; the message lists the known ones.
    """
    family = name.partition("@")[0]
    try:
        return _METRICS[family]
    except KeyError:
        raise KeyError(f"unknown metric {family!r}; available metrics: {', '.join(available_metrics())}") from None


def metric_title(key: str, *, short: bool = False) -> str:
    """How tables name a metric key: ``"Recall"`` (or ``"R@10"`` with ``short``); an unknown key as itself."""
    family, _, k = key.partition("@")
    metric = _METRICS.get(family)
    if metric is None:
        return key
    return (f"{metric.short}@{k}" if k else metric.short) if short else metric.title


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


def metric_names(ks: int | Sequence[int], metrics: Sequence[str] | None = None) -> list[str]:
    """Metric names in canonical order: by increasing K, then the registry's order (precision, recall, ndcg, then any
    registered later), e.g. ``"recall@10"``. ``metrics``: a subset of the registered families (default: all)."""
    known = available_metrics()
    if metrics is None:
        metrics = known
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected some of {known}")
    return [f"{m}@{k}" for k in normalize_ks(ks) for m in known if m in metrics]


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
    hits: Tensor, num_positives: Tensor, ks: int | Sequence[int], *, ndcg: str = "standard",
    metrics: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Every registered metric (or those of ``metrics``) at every K, per row, as float64 ``[B]`` tensors keyed like
    ``"ndcg@10"``.

    Args:
        hits: ``[B, K_max]`` bool, ``hits[b, r]`` = the item at rank ``r`` of row ``b`` is a positive.
        num_positives: ``[B]`` size of each row's positive set :math:`|P|`.
        ks: the cut-offs; each must be ``<= K_max``.
        ndcg: ``"standard"`` or ``"official"`` (the released code's IDCG).
        metrics: families to compute (default: every registered one).

    Rows without positives get 0 for every metric (the evaluator skips such users before this point).
    Keys follow :func:`metric_names`.
    """
    if ndcg not in NDCG_VARIANTS:
        raise ValueError(f"unknown ndcg variant {ndcg!r}; expected one of {NDCG_VARIANTS}")
    if hits.dtype != torch.bool or hits.dim() != 2:
        raise ValueError(f"hits must be a bool [B, K_max] matrix, got {hits.dtype} {tuple(hits.shape)}")
    ks = normalize_ks(ks)
    names = metric_names(ks, metrics)
    num_rows, kmax = hits.shape
    if ks[-1] > kmax:
        raise ValueError(f"K = {ks[-1]} exceeds the {kmax} ranked positions in hits")
    if num_positives.shape != (num_rows,):
        raise ValueError(f"num_positives must have shape ({num_rows},), got {tuple(num_positives.shape)}")
    ranked = RankedLists(hits, num_positives.to(device=hits.device, dtype=torch.float64), ndcg)
    if bool((ranked.hit_count[:, -1] > ranked.num_positives).any()):
        raise ValueError("a row has more hits than positives; hits and num_positives disagree")
    out: dict[str, Tensor] = {}
    for name in names:
        family, _, k = name.partition("@")
        value = _METRICS[family].compute(ranked, int(k))
        if not isinstance(value, Tensor) or value.shape != (num_rows,):
            raise ValueError(f"metric {family!r} returned {type(value).__name__} "
                             f"{tuple(getattr(value, 'shape', ()))}; expected a [{num_rows}] tensor")
        out[name] = value.to(torch.float64)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The built-in metrics (docs/protocol.md, "Metrics")


@register_metric("precision", title="Precision", short="P", order=10)
def precision(ranked: RankedLists, k: int) -> Tensor:
    """hits / K."""
    return ranked.hits_at(k) / k


@register_metric("recall", title="Recall", short="R", order=20)
def recall(ranked: RankedLists, k: int) -> Tensor:
    """hits / |P| (0 without positives)."""
    num_positives = ranked.num_positives
    return torch.where(num_positives > 0, ranked.hits_at(k) / num_positives.clamp(min=1.0), 0.0)


@register_metric("ndcg", title="NDCG", short="NDCG", order=30)
def ndcg(ranked: RankedLists, k: int) -> Tensor:
    """DCG@K over the ideal DCG of min(|P|, K) positions (``"standard"``) or min(hits, K) (``"official"``)."""
    if ranked.ndcg == "standard":
        ideal_positions = ranked.num_positives.clamp(max=k)  # min(|P|, K)
    else:
        ideal_positions = ranked.hits_at(k)  # the released code's: min(hits, K); hits <= K already
    idcg = ranked.ideal[ideal_positions.long()]
    return torch.where(idcg > 0, ranked.dcg[:, k - 1] / idcg.clamp(min=1e-300), 0.0)
