r"""Full-ranking evaluation: every item the user has not consumed is a candidate (docs/protocol.md, "Evaluation").

One forward pass in eval mode gives the embeddings; users are then ranked in batches whose size comes from a memory
budget. Each batch goes through four small steps, each its own function so that one can be replaced without touching
the others (a faster scoring path, for instance):

1. :func:`score_batch` — the model's ``score`` for the batch, ``[B, I]``. For the default dot-product score on CPU,
   :func:`dot_scorer` gives a faster path: :class:`CompiledDotScores` (the compiled kernel: ``torch.mm``'s bits, a
   user's scores independent of its batch, and each group's maximum for step 3 on the side), else
   :class:`BufferedDotScores` (numpy's BLAS into one reused buffer);
2. :func:`mask_scores_` — the items the protocol masks get a fixed score, in place, with one flat ``index_put_``
   (and :func:`refresh_group_maxima_` recomputes the maxima of the groups it touched);
3. :func:`grouped_top_k` — the ``K_max`` best items per user (:func:`~grcn_bench.benchmarks.metrics.top_k`'s result
   from the maxima of groups of 32 items, then ``torch.topk`` over the best groups; about 2x faster than
   ``torch.topk`` over a full catalogue);
4. :func:`~grcn_bench.benchmarks.metrics.hits_from_csr` and :func:`~grcn_bench.benchmarks.metrics.rank_metrics`,
   which computes every metric of the registry (``@register_metric``), so a registered metric is evaluated, stored
   and reported with no change here.

Protocols:

- ``"standard"`` (default, docs/protocol.md, "Evaluation"): validation masks the user's training items; test masks
  training and validation items; masked scores are :math:`-\infty`; NDCG's IDCG runs over :math:`\min(|P|, K)`
  positions.
- ``"official-grcn"`` (for the protocol audit only; docs/protocol.md, "The released code's protocol"): training
  items get the score ``1e-5`` instead (so they still outrank every negative score), validation items are not masked
  at test time, and NDCG's IDCG runs over :math:`\min(\mathrm{hits}, K)` positions.

In both, users with no held-out positive in the split are skipped and metrics are averaged over the rest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from grcn_bench.datasets.base import InteractionGraph, RecDataset
from grcn_bench.models import ops
from grcn_bench.models.base import Embeddings, Recommender

from .metrics import hits_from_csr, normalize_ks, pad_hits, rank_metrics, top_k

#: Columns per group in :func:`grouped_top_k` (32 measured best for K in 10..50 over 76k items).
TOPK_GROUP = 32

EVAL_SPLITS = ("val", "test")

#: Bytes of one score (float32).
SCORE_BYTES = 4
#: ``[B, I]`` float32 blocks budgeted per batch: the score block itself (masked and ranked in place) plus one more of
#: the same size for transient copies: a model's ``score`` commonly materialises one intermediate of that shape (a
#: matmul before a sum or a bias), and on GPU ``topk``'s selection workspace is of that order. The rest is small next
#: to a block: the mask's flat indices scale with the batch's interactions (16 bytes per masked pair, a fraction of a
#: block below ~25 % density), the hit and metric matrices with ``B * K_max``, and CPU ``topk`` keeps one row-sized
#: buffer per thread, not per row.
SCORE_BLOCKS = 2


@dataclass(frozen=True)
class Protocol:
    """How an evaluation protocol masks and normalises."""

    name: str
    mask_value: float
    mask_validation_at_test: bool
    ndcg: str

    def masked_splits(self, split: str) -> tuple[str, ...]:
        """The splits whose items are masked when ranking for ``split``."""
        if split == "test" and self.mask_validation_at_test:
            return ("train", "val")
        return ("train",)


PROTOCOLS: dict[str, Protocol] = {
    "standard": Protocol("standard", float("-inf"), mask_validation_at_test=True, ndcg="standard"),
    "official-grcn": Protocol("official-grcn", 1e-5, mask_validation_at_test=False, ndcg="official"),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown evaluation protocol {name!r}; expected one of {tuple(PROTOCOLS)}") from None


@dataclass
class EvalResult:
    """Per-user metrics of one evaluation.

    ``users`` ``[n]`` are the evaluated user ids (those with at least one held-out positive in the split), in
    increasing order; ``per_user`` maps each metric name (canonical order, see
    :func:`~grcn_bench.benchmarks.metrics.metric_names`) to a float64 array ``[n]`` aligned with ``users``.
    ``top_items`` ``[n, K_max]`` holds the ranked lists when asked for (``-1`` marks a position with no item: the
    catalogue is smaller than ``K_max`` or only masked items were left).
    """

    split: str
    ks: tuple[int, ...]
    protocol: str
    users: np.ndarray
    per_user: dict[str, np.ndarray]
    top_items: np.ndarray | None = None

    @property
    def num_users(self) -> int:
        return int(self.users.size)

    def mean(self) -> dict[str, float]:
        """Every metric averaged over the evaluated users."""
        return {name: float(values.mean()) for name, values in self.per_user.items()}


def eval_batch_size(memory_budget: int, num_items: int) -> int:
    """Users per batch so that :data:`SCORE_BLOCKS` float32 ``[B, I]`` blocks fit in ``memory_budget`` bytes."""
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    return max(1, memory_budget // (max(1, num_items) * SCORE_BYTES * SCORE_BLOCKS))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own previous mode (mixed modes survive)."""
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in previous:
            module.training = training


def compute_embeddings(model: Recommender, graph: InteractionGraph) -> Embeddings:
    """The model's full-graph forward in eval mode without autograd (the one forward of an evaluation)."""
    with torch.no_grad(), eval_mode(model):
        return model(graph)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def csr_to_torch(indptr: np.ndarray, items: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """A numpy CSR ``(indptr, items)`` as int64 tensors on ``device``."""
    as_long = dict(dtype=torch.long, device=device)
    return torch.as_tensor(indptr, **as_long), torch.as_tensor(items, **as_long)


def csr_select(indptr: Tensor, items: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The batch-local CSR ``(indptr [B+1], items)`` of the given rows of a CSR matrix, without a per-row loop."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    local = torch.zeros(rows.numel() + 1, dtype=torch.long, device=indptr.device)
    torch.cumsum(counts, 0, out=local[1:])
    total = int(local[-1])
    # Global position of every selected entry: its row's start plus its offset inside the row.
    offset = torch.arange(total, device=indptr.device) - torch.repeat_interleave(local[:-1], counts, output_size=total)
    position = torch.repeat_interleave(starts, counts, output_size=total) + offset
    return local, items[position]


def score_batch(model: Recommender, emb: Embeddings, users: Tensor, protected: frozenset[int] = frozenset()) -> Tensor:
    """``[B, I]`` scores of ``users`` that the caller may modify in place.

    ``protected`` holds storage addresses (the model's parameters and the embeddings): a ``score`` that returns a view
    of one of them is copied, so that masking never writes into the model.
    """
    scores = model.score(emb, users)
    expected = (users.numel(), emb.item.size(0))
    if scores.dim() != 2 or tuple(scores.shape) != expected or not scores.is_floating_point():
        raise ValueError(
            f"{type(model).__name__}.score returned {scores.dtype} {tuple(scores.shape)}; expected a floating "
            f"{expected} matrix"
        )
    if scores.untyped_storage().data_ptr() in protected:
        scores = scores.clone()
    return scores


def grouped_top_k(scores: Tensor, k: int, group: int = TOPK_GROUP,
                  maxima: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(values, items)``, each ``[B, min(k, I)]``: the ``k`` best items of every row, best first, as
    :func:`~grcn_bench.benchmarks.metrics.top_k` gives them.

    The row's columns are cut into groups of ``group``; only the ``k`` groups with the largest maxima (and the
    columns after the last whole group) can hold the row's ``k`` largest values, since each of those groups holds a
    value at least as large as anything in the others. So one streaming max over the scores, then ``torch.topk`` over
    ``k * group`` candidates instead of the whole catalogue. NaN ranks first, as with ``torch.topk`` (a group's max is
    NaN when it holds one). Among exactly equal scores the choice is implementation-defined, as it is for
    ``torch.topk``; it depends on the row alone. Small catalogues go straight to ``torch.topk``.

    ``maxima`` (``[B, I // group]``, each group's ``amax`` of ``scores`` as they are now) skips the streaming max:
    :class:`CompiledDotScores` computes it with the scores.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [B, I] matrix, got shape {tuple(scores.shape)}")
    if k <= 0 or group <= 0:
        raise ValueError(f"k and group must be positive, got k={k}, group={group}")
    rows, num_items = scores.shape
    num_groups = num_items // group
    if maxima is not None and tuple(maxima.shape) != (rows, num_groups):
        raise ValueError(f"maxima must be [{rows}, {num_groups}] (one per group of {group}), got {tuple(maxima.shape)}")
    if num_groups < 4 * k or scores.stride(1) != 1:
        return top_k(scores, k)
    whole = num_groups * group
    if maxima is None:
        maxima = scores[:, :whole].view(rows, num_groups, group).amax(dim=2)  # [B, G]
    best_groups = torch.topk(maxima, k, dim=1, sorted=False).indices  # [B, k]
    offsets = torch.arange(group, device=scores.device)
    candidates = ((best_groups * group).unsqueeze(2) + offsets).flatten(1)  # [B, k * group] columns
    if whole < num_items:  # the columns after the last whole group are always candidates
        tail = torch.arange(whole, num_items, device=scores.device).expand(rows, -1)
        candidates = torch.cat([candidates, tail], dim=1)
    values, position = torch.topk(torch.gather(scores, 1, candidates), k, dim=1, largest=True, sorted=True)
    return values, torch.gather(candidates, 1, position)


def _default_dot_score_on_cpu(model: Recommender, emb: Embeddings, dtypes: tuple[torch.dtype, ...]) -> bool:
    user, item = emb.user, emb.item
    return (
        type(model).score is Recommender.score
        and user.device.type == "cpu"
        and item.device.type == "cpu"
        and user.dtype == item.dtype
        and user.dtype in dtypes
    )


class CompiledDotScores:
    """The default :meth:`Recommender.score` (``user @ item.T``) for batches of users, computed by the compiled kernel
    (:func:`grcn_bench.models.ops.dot_scores`) into one reused buffer, with the maximum of every group
    of :data:`TOPK_GROUP` items, which :func:`grouped_top_k` would otherwise compute in a second pass over the scores.

    The scores are ``torch.mm``'s, bit for bit (checked on this machine before first use:
    :func:`grcn_bench.models.ops.dot_scores_apply`), and each is summed on its own, so a user's scores
    do not depend on which users share its batch, nor on the memory budget. Each call overwrites the previous call's
    scores and maxima: use them (mask, rank) before the next call.

    Args:
        emb: float32 embeddings on the CPU.
        max_batch: the most users a call will score (the buffer's rows).
    """

    def __init__(self, emb: Embeddings, max_batch: int):
        self.user = emb.user.detach()
        self.num_items = emb.item.size(0)
        self.packed = ops.pack_score_items(emb.item.detach())
        self.buffer = self.user.new_empty(max(1, max_batch), self.packed.size(0) * ops.SCORE_PANEL)
        self.maxima = self.user.new_empty(max(1, max_batch), self.num_items // TOPK_GROUP)

    @staticmethod
    def applies(model: Recommender, emb: Embeddings) -> bool:
        """Whether the model scores with the default dot product and the compiled kernel computes ``torch.mm``'s
        scores here for these embeddings."""
        return (
            _default_dot_score_on_cpu(model, emb, (torch.float32,))
            and TOPK_GROUP == ops.SCORE_GROUP
            and ops.dot_scores_apply(emb.user.size(1))
        )

    def __call__(self, users: Tensor) -> tuple[Tensor, Tensor]:
        """``(scores [B, I], maxima [B, I // TOPK_GROUP])`` of ``users`` (views of the reused buffers)."""
        if users.numel() > self.buffer.size(0):
            raise ValueError(f"{users.numel()} users exceed the buffer's {self.buffer.size(0)} rows")
        rows = users.numel()
        out, maxima = self.buffer[:rows], self.maxima[:rows]
        if not ops.dot_scores(self.user[users], self.packed, out, maxima):
            raise RuntimeError("the compiled dot scores refused operands CompiledDotScores.applies accepted")
        return out[:, : self.num_items], maxima


class BufferedDotScores:
    """The default :meth:`Recommender.score` (``user @ item.T``) for batches of users, computed by numpy's BLAS into
    one reused ``[B, I]`` buffer and returned as a tensor view of it: the CPU path where :class:`CompiledDotScores`
    cannot run (no compiled kernels, float64, a depth whose ``torch.mm`` sums are not known, a machine whose
    ``torch.mm`` sums otherwise).

    On the CPUs this suite is measured on, OpenBLAS through ``np.matmul(..., out=buffer)`` reaches 70-85 % of the
    machine's dense matmul rate on these shapes, ``torch.mm`` 30-50 %, and reusing the buffer avoids
    a page-faulting allocation of the size of the budget for every batch. Its scores can differ from ``torch.mm``'s
    in the last bit, and OpenBLAS gives some of a user's scores other last bits in batches of other sizes. Each call
    overwrites the previous call's scores: use them (mask, rank) before the next call.

    Args:
        emb: embeddings on the CPU, ``user`` and ``item`` of the same float dtype.
        max_batch: the most users a call will score (the buffer's rows).
    """

    def __init__(self, emb: Embeddings, max_batch: int):
        self.user = emb.user.detach().numpy()
        self.item_t = emb.item.detach().numpy().T  # a transposed view: BLAS reads it as is, no copy
        self.buffer = np.empty((max(1, max_batch), self.item_t.shape[1]), dtype=self.user.dtype)

    @staticmethod
    def applies(model: Recommender, emb: Embeddings) -> bool:
        """Whether the model scores with the default dot product and the embeddings allow the numpy path."""
        return _default_dot_score_on_cpu(model, emb, (torch.float32, torch.float64))

    def __call__(self, users: Tensor) -> tuple[Tensor, None]:
        """``(scores [B, I], None)`` of ``users`` (a view of the reused buffer); no group maxima."""
        if users.numel() > self.buffer.shape[0]:
            raise ValueError(f"{users.numel()} users exceed the buffer's {self.buffer.shape[0]} rows")
        out = self.buffer[: users.numel()]
        np.matmul(self.user[users.numpy()], self.item_t, out=out)
        return torch.from_numpy(out), None


def dot_scorer(model: Recommender, emb: Embeddings, max_batch: int) -> CompiledDotScores | BufferedDotScores | None:
    """The fastest path that computes ``model``'s scores here, or ``None`` for :func:`score_batch`."""
    if CompiledDotScores.applies(model, emb):
        return CompiledDotScores(emb, max_batch)
    if BufferedDotScores.applies(model, emb):
        return BufferedDotScores(emb, max_batch)
    return None


def mask_scores_(scores: Tensor, indptr: Tensor, items: Tensor, value: float) -> tuple[Tensor, Tensor]:
    """Set ``scores[b, items of row b]`` to ``value`` for every row of the batch-local CSR, in place; returns the
    ``(rows, items)`` it set."""
    counts = indptr[1:] - indptr[:-1]
    batch_rows = torch.arange(scores.size(0), device=scores.device)
    rows = torch.repeat_interleave(batch_rows, counts, output_size=items.numel())
    scores.index_put_((rows, items), torch.tensor(value, dtype=scores.dtype, device=scores.device))
    return rows, items


def refresh_group_maxima_(maxima: Tensor, scores: Tensor, rows: Tensor, items: Tensor,
                          group: int = TOPK_GROUP) -> Tensor:
    """Recompute, in place, the maxima ``[B, G]`` of the groups of ``group`` columns of ``scores`` that hold a changed
    position ``(rows[e], items[e])`` (columns past the last whole group have none): after masking, a group's maximum
    may have been a masked score."""
    num_groups = maxima.size(1)
    groups = torch.div(items, group, rounding_mode="floor")
    whole = groups < num_groups
    touched = torch.unique(rows[whole] * num_groups + groups[whole])
    if touched.numel() == 0:
        return maxima
    touched_rows = torch.div(touched, num_groups, rounding_mode="floor")
    touched_groups = touched - touched_rows * num_groups
    columns = (touched_groups * group).unsqueeze(1) + torch.arange(group, device=scores.device)
    maxima[touched_rows, touched_groups] = scores[touched_rows.unsqueeze(1), columns].amax(dim=1)
    return maxima


def pad_items(top: Tensor, kmax: int) -> Tensor:
    """Pad ``[B, k]`` item lists with ``-1`` up to ``kmax`` columns (a catalogue smaller than ``kmax``)."""
    if top.size(1) >= kmax:
        return top
    return torch.nn.functional.pad(top, (0, kmax - top.size(1)), value=-1)


@contextlib.contextmanager
def _phase(timings: dict[str, float] | None, name: str, device: torch.device) -> Iterator[None]:
    """Add the block's wall-clock seconds to ``timings[name]`` (nothing at all when ``timings`` is None)."""
    if timings is None:
        yield
        return
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - started


def _storage_addresses(model: torch.nn.Module, emb: Embeddings) -> frozenset[int]:
    tensors = [*model.parameters(), *model.buffers(), *(t for t in emb if t is not None)]
    return frozenset(t.untyped_storage().data_ptr() for t in tensors)


def evaluate(
    model: Recommender,
    dataset: RecDataset,
    split: str = "val",
    *,
    ks: int | Sequence[int] = (10,),
    graph: InteractionGraph | None = None,
    embeddings: Embeddings | None = None,
    memory_budget: int = 1 << 30,
    protocol: str = "standard",
    device: torch.device | str | None = None,
    keep_top_items: bool = False,
    timings: dict[str, float] | None = None,
) -> EvalResult:
    """Rank all items for every user with a held-out positive in ``split`` and compute metrics @K.

    Args:
        model: the recommender; its train/eval mode is restored afterwards.
        dataset: supplies the held-out pairs and the items to mask.
        split: ``"val"`` or ``"test"``.
        ks: cut-offs (sorted and de-duplicated in the result).
        graph: the forward's input (default ``dataset.graph()`` on ``device``).
        embeddings: precomputed embeddings; when given, no forward runs and ``graph`` is unused.
        memory_budget: bytes allowed for the per-batch score blocks (see :func:`eval_batch_size`).
        protocol: ``"standard"`` or ``"official-grcn"`` (audit only).
        device: where the forward and ranking run (default: the model's device; with ``embeddings``, theirs).
        keep_top_items: also return every evaluated user's top-``K_max`` list.
        timings: when given, seconds spent per phase are added to it under ``"forward"``, ``"score"`` (with
            :class:`CompiledDotScores`, the groups' maxima too), ``"mask"`` (and the touched groups' maxima),
            ``"rank"`` (top-K) and ``"metrics"`` (on CUDA each phase ends with a synchronisation, which costs a little).
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"cannot evaluate split {split!r}; expected one of {EVAL_SPLITS}")
    rules = get_protocol(protocol)
    ks = normalize_ks(ks)
    kmax = ks[-1]
    batch_size = eval_batch_size(memory_budget, dataset.num_items)

    if embeddings is None:
        device = torch.device(device) if device is not None else model_device(model)
        with _phase(timings, "forward", device):
            embeddings = compute_embeddings(model, graph if graph is not None else dataset.graph().to(device))
    if embeddings.user.size(0) != dataset.num_users or embeddings.item.size(0) != dataset.num_items:
        raise ValueError(
            f"embeddings cover {embeddings.user.size(0)} users and {embeddings.item.size(0)} items; the dataset has "
            f"{dataset.num_users} and {dataset.num_items}"
        )
    device = embeddings.user.device

    held_indptr, held_items = dataset.user_items(split)
    users = np.flatnonzero(np.diff(held_indptr) > 0)
    if users.size == 0:
        raise ValueError(f"split {split!r} of {dataset.name!r} has no held-out pairs: nothing to evaluate")
    held = csr_to_torch(held_indptr, held_items, device)
    masked = csr_to_torch(*dataset.user_items(*rules.masked_splits(split)), device)
    protected = _storage_addresses(model, embeddings)
    scorer = dot_scorer(model, embeddings, min(batch_size, users.size))

    per_user: dict[str, list[Tensor]] = {}
    top_lists: list[Tensor] = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, users.size, batch_size):
            batch = torch.as_tensor(users[start : start + batch_size], dtype=torch.long, device=device)
            with _phase(timings, "score", device):
                if scorer is not None:
                    scores, maxima = scorer(batch)
                else:
                    scores, maxima = score_batch(model, embeddings, batch, protected), None
            with _phase(timings, "mask", device):
                masked_rows, masked_items = mask_scores_(scores, *csr_select(*masked, batch), rules.mask_value)
                if maxima is not None:
                    refresh_group_maxima_(maxima, scores, masked_rows, masked_items)
            with _phase(timings, "rank", device):
                values, top = grouped_top_k(scores, kmax, maxima=maxima)
            # torch.topk ranks NaN above every number, so a NaN anywhere in a row surfaces in its first column.
            if bool(torch.isnan(values[:, 0]).any()):
                bad = int(batch[torch.isnan(values[:, 0])][0])
                raise ValueError(f"{type(model).__name__} produced NaN scores (first for user {bad})")
            with _phase(timings, "metrics", device):
                pos_indptr, pos_items = csr_select(*held, batch)
                hits = pad_hits(hits_from_csr(top, pos_indptr, pos_items, dataset.num_items), kmax)
                metrics = rank_metrics(hits, pos_indptr[1:] - pos_indptr[:-1], ks, ndcg=rules.ndcg)
                for name, value in metrics.items():
                    per_user.setdefault(name, []).append(value.cpu())
            if keep_top_items:
                top = top.masked_fill(values == float("-inf"), -1)
                top_lists.append(pad_items(top, kmax).cpu())

    return EvalResult(
        split=split,
        ks=ks,
        protocol=rules.name,
        users=users,
        per_user={name: torch.cat(parts).numpy().astype(np.float64) for name, parts in per_user.items()},
        top_items=torch.cat(top_lists).numpy() if keep_top_items else None,
    )
