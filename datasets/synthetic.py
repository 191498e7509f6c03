r"""Synthetic multimedia interactions with planted preferences and labelled false positives (docs/protocol.md,
"Synthetic data").

The generator plants the structure GRCN's argument is about, with ground truth:

- a latent space of dimension :math:`k` (default 16): item :math:`i` has a content factor :math:`z_i` and a
  collaborative factor :math:`c_i`; user :math:`u` has preferences :math:`\theta_u` (content) and :math:`\phi_u`
  (collaborative). Each factor is clustered, as communities and genres are in real data:
  :math:`\sqrt{\rho}\, \mu_g + \sqrt{1 - \rho}\, \epsilon` with ``clusters`` random centres :math:`\mu_g`
  (one set for content, one for collaborative; users and items assigned uniformly) and every coordinate of
  :math:`\mu_g, \epsilon` drawn from :math:`\mathcal{N}(0, 1/k)`. ``cluster_strength`` :math:`\rho = 0` gives
  unstructured Gaussian factors; the default 0.7 makes the preferences learnable from a few interactions per item
  (BPR-MF beats popularity about threefold on the default presets) while leaving head-room to the true ranking;
- modality features that show the content factor only, each through its own fixed random map and noise level:

  .. math::
      x_i^m = \tanh(A_m z_i) + \sigma_m \varepsilon, \qquad A_m \in \mathbb{R}^{D_m \times k},\
      (A_m)_{jl}, \varepsilon_j \sim \mathcal{N}(0, 1);

- an item popularity :math:`\log \mathrm{pop}_i \sim \mathcal{N}(0, s_{pop}^2)` and a heavy-tailed (log-normal)
  activity :math:`n_u` per user, scaled so the counts sum to the requested number of interactions;
- true interactions: user :math:`u` draws :math:`n_u - n_u^{noise}` distinct items, sequentially without
  replacement, with

  .. math::
      P(i \mid u) \propto \exp\big(\beta (\theta_u^\top z_i + \phi_u^\top c_i)\big) \cdot \mathrm{pop}_i ;

- false positives: :math:`n_u^{noise} \approx \mathrm{noise} \cdot n_u` (stochastic rounding) further distinct
  items drawn from popularity alone, labelled ``noise=True``;
- a per-user 8:1:1 split (:func:`~grcn_bench.datasets.split.split_per_user`) seeded by ``split_seed``; noise labels
  travel with the edges. Noise pairs that land in validation or test stay there as ordinary held-out pairs (the
  evaluation treats every held-out pair as a positive, as it must for real data); labels are kept for train edges
  only, and the number of held-out noise pairs is recorded in the card (``heldout_noise_pairs``).

Sampling without replacement is done exactly and without materialising anything larger than one chunk of users:
draws with replacement from each user's distribution (a two-level inverse CDF over blocks of 64 items) in which
repeats are skipped are distributed as sequential draws without replacement; users still short after a few rounds
are finished with the Gumbel-top-k trick on their remaining items. Every random number comes from
``np.random.default_rng`` streams spawned from ``seed`` (latents, activity, interactions, noise, each modality,
text), so the same parameters give byte-identical arrays on the same software stack, and changing e.g. a feature
width leaves the interactions unchanged.

Overrides (spec string ``synthetic:<preset>?key=value&...`` or keyword arguments of :func:`generate_synthetic`):

======================  ==============================================================================================
``users``               number of users (after ``scale``)
``items``               number of items (after ``scale``)
``interactions``        total interactions over all splits, false positives included
``per_user``            mean interactions per user (alternative to ``interactions``)
``noise``               fraction of every user's interactions that are popularity-only false positives (0.2)
``seed``                seed of the generator (0)
``split_seed``          seed of the 8:1:1 split (0)
``scale``               ``full`` (the real dataset's users, items and interactions) or a factor on the preset's sizes
``dim``                 latent dimension ``k`` (16)
``beta``                preference sharpness :math:`\beta`
``pop_skew``            standard deviation of log-popularity
``activity_skew``       standard deviation of log-activity (heavier tail when larger)
``min_per_user``        fewest interactions a user has (5)
``modalities``          subset of the preset's modalities, e.g. ``va``
``text``                ``dense`` (default) or ``words``: the textual modality as word ids (:class:`WordBags`)
``vocab``               vocabulary size for ``text=words``
``words_per_item``      mean number of distinct words per item for ``text=words``
``clusters``            number of latent cluster centres per factor (16)
``cluster_strength``    :math:`\rho`, the share of a factor's variance explained by its cluster (0.7)
======================  ==============================================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import parse_qsl

import numpy as np
import torch

from .base import MODALITIES, DatasetError, RecDataset
from .formats import register_format
from .split import TRAIN, split_per_user
from .validate import validate

__all__ = ["PRESETS", "SyntheticParams", "SyntheticPreset", "SyntheticWorld", "generate_synthetic",
           "load_synthetic_spec", "parse_synthetic_spec", "resolve_params", "simulate"]

_BLOCK = 64  # columns per block of the two-level inverse CDF
_CHUNK_ELEMENTS = 1 << 25  # users x items per chunk of the preference matrix (128 MB of float32)


@dataclass(frozen=True)
class SyntheticPreset:
    """Default sizes and shape of one synthetic dataset.

    ``full`` holds the real dataset's (users, items, interactions), used by ``scale=full``.
    """

    users: int
    items: int
    interactions: int
    dims: Mapping[str, int]
    sigmas: Mapping[str, float]
    full: tuple[int, int, int] | None = None
    beta: float = 8.0
    pop_skew: float = 1.0
    activity_skew: float = 0.8
    min_per_user: int = 5
    vocab: int = 1000
    words_per_item: float = 8.0
    clusters: int = 16
    cluster_strength: float = 0.7
    description: str = ""


PRESETS: dict[str, SyntheticPreset] = {
    "tiny": SyntheticPreset(
        users=60, items=90, interactions=900, dims={"v": 16, "t": 8}, sigmas={"v": 0.3, "t": 0.8},
        vocab=50, words_per_item=4.0, description="unit tests: two small modalities, generated in milliseconds",
    ),
    "movielens": SyntheticPreset(
        users=1200, items=800, interactions=15_000, dims={"v": 2048, "a": 128, "t": 100},
        sigmas={"v": 0.5, "a": 1.0, "t": 0.75}, full=(55_485, 5_986, 1_239_508),
        description="Movielens-shaped: more users than items, dense users; v 2048, a 128, t 100",
    ),
    "tiktok": SyntheticPreset(
        users=1000, items=2500, interactions=13_000, dims={"v": 128, "a": 128, "t": 128},
        sigmas={"v": 0.5, "a": 0.8, "t": 1.0}, full=(36_656, 76_085, 726_065),
        description="Tiktok-shaped: many items; v, a, t 128 each",
    ),
    "kwai": SyntheticPreset(
        users=400, items=2500, interactions=14_000, dims={"v": 2048}, sigmas={"v": 0.5},
        full=(7_010, 86_483, 298_492), activity_skew=1.0,
        description="Kwai-shaped: few, heavy users; v 2048 only",
    ),
}

#: Override key -> type; ``scale`` is ``"full"`` or a float.
OVERRIDE_TYPES: dict[str, type] = {
    "users": int, "items": int, "interactions": int, "per_user": float, "noise": float, "seed": int,
    "split_seed": int, "scale": str, "dim": int, "beta": float, "pop_skew": float, "activity_skew": float,
    "min_per_user": int, "modalities": str, "text": str, "vocab": int, "words_per_item": float, "clusters": int,
    "cluster_strength": float,
}


@dataclass(frozen=True)
class SyntheticParams:
    """Every parameter of one generated dataset, after the preset, ``scale`` and overrides are resolved."""

    preset: str
    users: int
    items: int
    interactions: int
    noise: float
    seed: int
    split_seed: int
    scale: str
    dim: int
    beta: float
    pop_skew: float
    activity_skew: float
    min_per_user: int
    dims: dict[str, int]
    sigmas: dict[str, float]
    text: str
    vocab: int
    words_per_item: float
    clusters: int
    cluster_strength: float
    overrides: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        query = "&".join(f"{key}={value}" for key, value in sorted(self.overrides.items()))
        return f"synthetic:{self.preset}" + (f"?{query}" if query else "")

    def card_parameters(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out.pop("overrides")
        return out


def coerce_override(key: str, value: object, where: str = "synthetic") -> object:
    """Convert one override (e.g. a spec-string value) to its type; unknown keys list the valid ones."""
    if key not in OVERRIDE_TYPES:
        raise DatasetError(where, f"unknown synthetic parameter {key!r}", f"one of {', '.join(sorted(OVERRIDE_TYPES))}")
    kind = OVERRIDE_TYPES[key]
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is int and isinstance(value, str):
            return int(value.replace("_", ""))
        return kind(value)
    except (TypeError, ValueError):
        raise DatasetError(where, f"parameter {key}={value!r} is not a valid {kind.__name__}") from None


def resolve_params(preset: str = "tiny", **overrides: object) -> SyntheticParams:
    """Apply ``scale`` and overrides to a preset, and check that the result can be generated."""
    if preset not in PRESETS:
        raise DatasetError(f"synthetic:{preset}", "unknown synthetic preset", f"one of {', '.join(PRESETS)}")
    where = f"synthetic:{preset}"
    given = {key: coerce_override(key, value, where) for key, value in overrides.items()}
    p = PRESETS[preset]
    users, items, interactions = p.users, p.items, p.interactions
    scale = str(given.get("scale", "1"))
    if scale == "full":
        if p.full is None:
            raise DatasetError(where, "scale=full is not defined for this preset", "movielens, tiktok or kwai")
        users, items, interactions = p.full
    else:
        try:
            factor = float(scale)
        except ValueError:
            raise DatasetError(where, f"scale={scale!r}", "'full' or a positive number") from None
        if not factor > 0:
            raise DatasetError(where, f"scale={scale!r}", "'full' or a positive number")
        users, items = max(1, round(users * factor)), max(2, round(items * factor))
        interactions = max(1, round(interactions * factor))
    users = int(given.get("users", users))
    items = int(given.get("items", items))
    if "interactions" in given and "per_user" in given:
        raise DatasetError(where, "both interactions and per_user given", "at most one of them")
    if "per_user" in given:
        interactions = round(float(given["per_user"]) * users)
    interactions = int(given.get("interactions", interactions))

    modalities = str(given.get("modalities", "".join(p.dims))).replace(",", "")
    if not modalities or set(modalities) - set(p.dims) or len(set(modalities)) != len(modalities):
        raise DatasetError(where, f"modalities={modalities!r}", f"a subset of {''.join(p.dims)!r}")
    text = str(given.get("text", "dense"))
    if text not in ("dense", "words"):
        raise DatasetError(where, f"text={text!r}", "'dense' or 'words'")
    if text == "words" and "t" not in modalities:
        raise DatasetError(where, "text=words needs the textual modality", "a preset or modalities with 't'")
    params = SyntheticParams(
        preset=preset, users=users, items=items, interactions=interactions,
        noise=float(given.get("noise", 0.2)), seed=int(given.get("seed", 0)),
        split_seed=int(given.get("split_seed", 0)), scale=scale, dim=int(given.get("dim", 16)),
        beta=float(given.get("beta", p.beta)), pop_skew=float(given.get("pop_skew", p.pop_skew)),
        activity_skew=float(given.get("activity_skew", p.activity_skew)),
        min_per_user=int(given.get("min_per_user", p.min_per_user)),
        dims={m: p.dims[m] for m in MODALITIES if m in modalities},
        sigmas={m: p.sigmas[m] for m in MODALITIES if m in modalities},
        text=text, vocab=int(given.get("vocab", p.vocab)),
        words_per_item=float(given.get("words_per_item", p.words_per_item)),
        clusters=int(given.get("clusters", p.clusters)),
        cluster_strength=float(given.get("cluster_strength", p.cluster_strength)), overrides=given,
    )
    _check_params(params, where)
    return params


def _max_per_user(params: SyntheticParams) -> int:
    """Cap on a user's interactions: half the catalogue keeps sampling without replacement well-conditioned."""
    return max(params.min_per_user, params.items // 2)


def _check_params(p: SyntheticParams, where: str) -> None:
    problems = [
        (p.users >= 1 and p.items >= 2, f"{p.users} users x {p.items} items", "users >= 1 and items >= 2"),
        (0.0 <= p.noise < 1.0, f"noise={p.noise}", "a fraction in [0, 1)"),
        (p.dim >= 1, f"dim={p.dim}", "a latent dimension >= 1"),
        (p.min_per_user >= 1, f"min_per_user={p.min_per_user}", ">= 1"),
        (p.min_per_user <= p.items // 2, f"min_per_user={p.min_per_user} with {p.items} items", "<= items / 2"),
        (p.beta >= 0 and p.pop_skew >= 0 and p.activity_skew >= 0, "negative beta, pop_skew or activity_skew",
         "non-negative values"),
        (p.users * p.min_per_user <= p.interactions <= p.users * _max_per_user(p),
         f"{p.interactions} interactions for {p.users} users",
         f"between {p.users * p.min_per_user} (min_per_user each) and {p.users * _max_per_user(p)} (half the items "
         "each)"),
        (p.clusters >= 1 and 0.0 <= p.cluster_strength <= 1.0, f"clusters={p.clusters}, "
         f"cluster_strength={p.cluster_strength}", "clusters >= 1 and cluster_strength in [0, 1]"),
        (p.vocab >= 1 and 1 <= p.words_per_item <= p.vocab, f"vocab={p.vocab}, words_per_item={p.words_per_item}",
         "1 <= words_per_item <= vocab"),
    ]
    for ok, problem, expected in problems:
        if not ok:
            raise DatasetError(where, problem, expected)


# --------------------------------------------------------------------------------------------------------------
# Sampling helpers


def allocate_counts(total: int, weights: np.ndarray, low: int, high: int) -> np.ndarray:
    """Integers in ``[low, high]`` proportional to ``weights`` that sum exactly to ``total`` (largest remainders)."""
    weights = np.asarray(weights, dtype=np.float64)
    if not weights.size * low <= total <= weights.size * high:
        raise ValueError(f"cannot split {total} into {weights.size} counts in [{low}, {high}]")
    ideal = total * weights / weights.sum()
    counts = np.clip(np.floor(ideal).astype(np.int64), low, high)
    # Each pass moves every eligible count by one in the direction of the deficit; a few passes suffice.
    while (deficit := total - int(counts.sum())) != 0:
        step = 1 if deficit > 0 else -1
        eligible = np.flatnonzero(counts < high) if step > 0 else np.flatnonzero(counts > low)
        preference = (ideal - counts)[eligible] * step
        chosen = eligible[np.argsort(-preference, kind="stable")[: abs(deficit)]]
        counts[chosen] += step
    return counts


class _BlockSampler:
    """Draws with replacement from each row of a non-negative weight matrix by a two-level inverse CDF.

    ``weights`` is ``[R, N']`` float32 with ``N'`` a multiple of the block size and zero weight beyond column
    ``width``; ``totals`` are its :func:`block_totals` when already computed. The first level picks a block of 64
    columns from the row's block totals, the second a column within the block; only ``R x N' / 64`` cumulative
    sums are kept, so rows of any width cost one pass over the weights.
    """

    def __init__(self, weights: np.ndarray, width: int, totals: np.ndarray | None = None):
        rows, padded = weights.shape
        self.num_blocks = padded // _BLOCK
        self.blocks = weights.reshape(rows, self.num_blocks, _BLOCK)
        self.width = width
        if totals is None:
            totals = block_totals(weights)
        block_cdf = np.cumsum(totals, axis=1)
        if not (block_cdf[:, -1] > 0).all():
            raise RuntimeError("a row of sampling weights is all zero")
        # Row r's normalised CDF shifted by r: one sorted array for all rows, one searchsorted for all draws.
        self.flat_cdf = (block_cdf / block_cdf[:, -1:] + np.arange(rows)[:, None]).reshape(-1)

    def draw(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rows.size == 0:
            return rows.copy()
        level1 = np.searchsorted(self.flat_cdf, rows + rng.random(rows.size), side="right") - rows * self.num_blocks
        block = np.clip(level1, 0, self.num_blocks - 1)
        within = np.cumsum(self.blocks[rows, block], axis=1, dtype=np.float64)
        target = rng.random(rows.size) * within[:, -1]
        column = np.minimum((within <= target[:, None]).sum(1), _BLOCK - 1)  # first position whose CDF > target
        return np.minimum(block * _BLOCK + column, self.width - 1)

    def log_weights(self, rows: np.ndarray) -> np.ndarray:
        """``[len(rows), width]`` log-weights of the given rows (``-inf`` where the weight is 0)."""
        weights = self.blocks[np.asarray(rows, np.int64)].reshape(len(rows), -1)[:, : self.width]
        with np.errstate(divide="ignore"):
            return np.log(weights.astype(np.float64))


def block_totals(weights: np.ndarray) -> np.ndarray:
    """``[R, N' / 64]`` float64 sums of each block of 64 columns."""
    blocks = torch.from_numpy(weights).view(weights.shape[0], -1, _BLOCK)
    return blocks.sum(-1).numpy().astype(np.float64)


def _padded(width: int) -> int:
    return -(-width // _BLOCK) * _BLOCK


def sample_softmax_rows(
    left: np.ndarray,
    right: np.ndarray,
    bound: np.ndarray,
    need: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``r`` of ``left @ right``, ``need[r]`` distinct columns drawn without replacement from its softmax.

    Rows are processed in chunks through one reused float32 buffer. ``bound[r]`` must be an upper bound of row
    ``r``'s logits: subtracting it (inside the matmul, as one more column) keeps every weight ``exp(.) <= 1``
    without a pass for the row maximum. Rows whose weights all underflow are recomputed with their exact maximum.

    Args:
        left: ``[R, K]`` row factors.
        right: ``[K, N]`` column factors.
        bound: ``[R]`` upper bounds of the logits of each row.
        need: ``[R]`` number of distinct columns per row.

    Returns:
        ``(rows, columns)`` of the draws.
    """
    num_rows, width = left.shape[0], right.shape[1]
    padded = _padded(width)
    # Extra columns of ``left`` / rows of ``right``: the shift by -bound, and -1e4 (weight exactly 0) on padding.
    right_ext = np.zeros((right.shape[0] + 2, padded), dtype=np.float32)
    right_ext[:-2, :width] = right
    right_ext[-2] = 1.0
    right_ext[-1, width:] = -1e4
    left_ext = np.hstack([left, -bound[:, None], np.ones((num_rows, 1))]).astype(np.float32)
    chunk = min(num_rows, max(1, _CHUNK_ELEMENTS // padded))
    # One buffer for every chunk: fresh large allocations are page-fault bound, reuse is not.
    buffer = np.empty((chunk, padded), dtype=np.float32)
    rows_out, cols_out = [], []
    for start in range(0, num_rows, chunk):
        stop = min(num_rows, start + chunk)
        weights = np.matmul(left_ext[start:stop], right_ext, out=buffer[: stop - start])
        torch.from_numpy(weights).exp_()  # torch's vectorised exp is the fastest here
        totals = block_totals(weights)
        empty = np.flatnonzero(totals.max(1) < 1e-30)
        if empty.size:  # a loose bound underflowed these rows: shift by the exact row maximum instead
            logits = left_ext[start + empty] @ right_ext
            weights[empty] = np.exp(logits - logits.max(1, keepdims=True))
            totals[empty] = block_totals(weights[empty])
        sampler = _BlockSampler(weights, width, totals)
        rows, cols = sample_distinct(sampler.draw, sampler.log_weights, need[start:stop], width, rng)
        rows_out.append(rows + start)
        cols_out.append(cols)
    return np.concatenate(rows_out), np.concatenate(cols_out)


def sample_distinct(
    draw: Callable[[np.ndarray, np.random.Generator], np.ndarray],
    log_weights: Callable[[np.ndarray], np.ndarray],
    need: np.ndarray,
    width: int,
    rng: np.random.Generator,
    exclude: np.ndarray | None = None,
    rounds: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``r``, ``need[r]`` distinct columns not in ``exclude``, as sequential draws without replacement.

    ``draw(rows, rng)`` draws one column per entry of ``rows`` with replacement; repeats and excluded columns are
    skipped, which leaves the law of sequential sampling without replacement. Each round draws twice as many per
    missing column as the last. Rows still short after ``rounds`` rounds (concentrated distributions) are finished
    exactly by Gumbel-top-k over ``log_weights(rows)`` (``[len(rows), width]``) restricted to the free columns.

    Args:
        exclude: sorted keys ``row * width + column`` that no row may take.

    Returns:
        ``(rows, columns)`` of the accepted draws.
    """
    need = np.asarray(need, dtype=np.int64)
    taken = np.empty(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    remaining = need.copy()
    out_rows: list[np.ndarray] = []
    out_cols: list[np.ndarray] = []
    for round_index in range(rounds):
        active = np.flatnonzero(remaining > 0)
        if active.size == 0:
            break
        per_row = np.ceil(remaining[active] * 1.25 * 2**round_index).astype(np.int64) + 2
        rows = np.repeat(active, per_row)
        keys = rows * width + draw(rows, rng)
        fresh = first_occurrences(keys) & ~_contains(taken, keys)
        # Accept the first ``remaining[row]`` fresh draws of each row, in draw order (rows are contiguous).
        rank = np.cumsum(fresh)
        starts = np.concatenate([[0], np.cumsum(per_row)[:-1]])
        before = np.repeat(rank[starts] - fresh[starts], per_row)
        accepted = fresh & (rank - before <= remaining[rows])
        out_rows.append(rows[accepted])
        out_cols.append(keys[accepted] - rows[accepted] * width)
        taken = np.union1d(taken, keys[accepted])
        remaining -= np.bincount(rows[accepted], minlength=need.size)
    short = np.flatnonzero(remaining > 0)
    if short.size:
        scores = log_weights(short).astype(np.float64) + rng.gumbel(size=(short.size, width))
        lo = np.searchsorted(taken, short * width)
        hi = np.searchsorted(taken, (short + 1) * width)
        in_short = np.repeat(np.arange(short.size), hi - lo)
        positions = np.concatenate([taken[a:b] for a, b in zip(lo, hi, strict=True)]) - short[in_short] * width
        scores[in_short, positions] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, : remaining[short].max()]
        keep = np.arange(order.shape[1])[None, :] < remaining[short][:, None]
        if not np.isfinite(np.take_along_axis(scores, order, 1)[keep]).all():
            raise RuntimeError("a row needs more distinct columns than have positive weight")
        out_rows.append(np.repeat(short, remaining[short]))
        out_cols.append(order[keep].astype(np.int64))
    if not out_rows:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(out_rows), np.concatenate(out_cols)


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Bool mask of the first occurrence of every value of ``keys``, in order."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(keys.size, dtype=bool)
    first[order[1:][ordered[1:] == ordered[:-1]]] = False
    return first


def _contains(sorted_keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(query.shape, dtype=bool)
    position = np.minimum(np.searchsorted(sorted_keys, query), sorted_keys.size - 1)
    return sorted_keys[position] == query


# --------------------------------------------------------------------------------------------------------------
# The generator


class SyntheticWorld(NamedTuple):
    """Everything :func:`simulate` draws: unsplit pairs with labels, features, and the ground truth."""

    params: SyntheticParams
    pairs: np.ndarray  # [n, 2] int64 (user, item), all interactions
    noise: np.ndarray  # [n] bool, True for popularity-only false positives
    features: dict[str, np.ndarray]  # modality -> [I, D_m] float32
    words: np.ndarray | None  # [2, K] int64 (item, word) when text=words
    content: np.ndarray  # z [I, k]
    collaborative: np.ndarray  # c [I, k]
    theta: np.ndarray  # [U, k]
    phi: np.ndarray  # [U, k]
    log_pop: np.ndarray  # [I]

    def affinity(self, users: np.ndarray) -> np.ndarray:
        """``[B, I]`` true log-preference (up to a per-user constant) of ``users`` over all items."""
        b = self.params.beta
        return b * (self.theta[users] @ self.content.T + self.phi[users] @ self.collaborative.T) + self.log_pop


def _true_interactions(world: dict[str, np.ndarray], need: np.ndarray, beta: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    theta, phi, z, c, log_pop = (world[key] for key in ("theta", "phi", "z", "c", "log_pop"))
    # One matmul gives beta (theta.z + phi.c) + log pop: users carry [beta theta, beta phi, 1].
    left = np.hstack([beta * theta, beta * phi, np.ones((theta.shape[0], 1))])
    right = np.hstack([z, c, log_pop[:, None]]).T
    # Cauchy-Schwarz per factor: theta.z <= |theta| max|z| (and likewise for phi.c).
    max_z, max_c = np.linalg.norm(z, axis=1).max(), np.linalg.norm(c, axis=1).max()
    bound = beta * (np.linalg.norm(theta, axis=1) * max_z + np.linalg.norm(phi, axis=1) * max_c) + log_pop.max()
    return sample_softmax_rows(left, right, bound, need, rng)


def _noise_interactions(log_pop: np.ndarray, need: np.ndarray, owned: np.ndarray,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    num_items = log_pop.size
    weights = np.zeros((1, _padded(num_items)), dtype=np.float32)
    weights[0, :num_items] = np.exp(log_pop - log_pop.max())
    sampler = _BlockSampler(weights, num_items)

    def draw(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return sampler.draw(np.zeros_like(rows), rng)

    def log_weights(rows: np.ndarray) -> np.ndarray:
        return sampler.log_weights(np.zeros_like(rows))

    return sample_distinct(draw, log_weights, need, num_items, rng, exclude=owned)


def _features(z: np.ndarray, dim: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    mapping = rng.standard_normal((dim, z.shape[1])).astype(np.float32)
    out = np.empty((z.shape[0], dim), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // dim)
    for start in range(0, z.shape[0], step):
        block = np.tanh(z[start:start + step].astype(np.float32) @ mapping.T)
        block += np.float32(sigma) * rng.standard_normal(block.shape, dtype=np.float32)
        out[start:start + step] = block
    return out


def _words(z: np.ndarray, params: SyntheticParams, rng: np.random.Generator) -> np.ndarray:
    """Bags of distinct words whose topics follow the content factor: ``P(w | i) ∝ exp(2 z_i . W_w)``.

    ``W_w ~ N(0, I_k)`` and ``z_i`` has coordinates of variance ``1/k``, so the topic logits have spread about 2.
    """
    num_items = z.shape[0]
    topics = rng.standard_normal((params.vocab, z.shape[1]))
    counts = np.minimum(1 + rng.poisson(params.words_per_item - 1, num_items), params.vocab)
    bound = 2.0 * np.linalg.norm(z, axis=1) * np.linalg.norm(topics, axis=1).max()
    items, words = sample_softmax_rows(2.0 * z, topics.T, bound, counts, rng)
    order = np.lexsort((words, items))
    return np.stack([items[order], words[order]])


def _clustered_factors(num_items: int, num_users: int, params: SyntheticParams,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Item and user factors ``sqrt(rho) mu_g + sqrt(1 - rho) eps`` around ``clusters`` random centres.

    Every coordinate has variance ``1/k`` whatever ``rho``; a user and an item of the same cluster have an expected
    affinity of ``rho``, which gives the preferences the low-rank, community shape that real data has.
    """
    k, rho = params.dim, params.cluster_strength
    centres = rng.normal(0.0, 1.0 / math.sqrt(k), (params.clusters, k))
    out = []
    for count in (num_items, num_users):
        assignment = rng.integers(params.clusters, size=count)
        noise = rng.normal(0.0, 1.0 / math.sqrt(k), (count, k))
        out.append(math.sqrt(rho) * centres[assignment] + math.sqrt(1.0 - rho) * noise)
    return out[0], out[1]


def simulate(params: SyntheticParams) -> SyntheticWorld:
    """Draw one synthetic world (unsplit) from resolved parameters."""
    streams = np.random.SeedSequence(params.seed).spawn(6 + len(MODALITIES))
    latent_rng, activity_rng, true_rng, noise_rng, text_rng = (np.random.default_rng(s) for s in streams[:5])
    z, theta = _clustered_factors(params.items, params.users, params, latent_rng)
    c, phi = _clustered_factors(params.items, params.users, params, latent_rng)
    log_pop = latent_rng.normal(0.0, params.pop_skew, params.items)

    activity = activity_rng.lognormal(0.0, params.activity_skew, params.users)
    per_user = allocate_counts(params.interactions, activity, params.min_per_user, _max_per_user(params))
    expected = params.noise * per_user
    num_noise = np.floor(expected + activity_rng.random(params.users)).astype(np.int64)
    num_noise = np.minimum(num_noise, per_user - 1)  # every user keeps at least one true interaction

    world = {"theta": theta, "phi": phi, "z": z, "c": c, "log_pop": log_pop}
    true_users, true_items = _true_interactions(world, per_user - num_noise, params.beta, true_rng)
    owned = np.sort(true_users * params.items + true_items)
    noise_users, noise_items = _noise_interactions(log_pop, num_noise, owned, noise_rng)

    pairs = np.concatenate([np.stack([true_users, true_items], 1), np.stack([noise_users, noise_items], 1)])
    labels = np.concatenate([np.zeros(true_users.size, bool), np.ones(noise_users.size, bool)])
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs, labels = pairs[order], labels[order]

    features = {}
    for index, m in enumerate(MODALITIES):
        if m in params.dims and not (m == "t" and params.text == "words"):
            features[m] = _features(z, params.dims[m], params.sigmas[m], np.random.default_rng(streams[6 + index]))
    words = _words(z, params, text_rng) if params.text == "words" else None
    return SyntheticWorld(params, pairs, labels, features, words, z, c, theta, phi, log_pop)


def generate_synthetic(preset: str = "tiny", **overrides: object) -> RecDataset:
    """A synthetic :class:`RecDataset` from a preset (``tiny``, ``movielens``, ``tiktok``, ``kwai``) and overrides.

    See the module docstring for the model and the override keys. ``train_noise`` labels the planted false-positive
    training pairs; the card records every resolved parameter.

    Example:
        >>> data = generate_synthetic("tiktok", users=2000, noise=0.3, seed=7)
    """
    params = resolve_params(preset, **overrides)
    world = simulate(params)
    split = split_per_user(world.pairs, params.users, params.split_seed)
    train_noise = world.noise[split.assignment == TRAIN]
    where = params.name
    parameters = params.card_parameters()
    parameters["heldout_noise_pairs"] = int(world.noise.sum() - train_noise.sum())
    return validate(
        name=params.name,
        source_format="synthetic",
        path=None,
        num_users=params.users,
        num_items=params.items,
        splits={"train": split.train, "val": split.val, "test": split.test},
        sources={key: where for key in ("train", "val", "test", *MODALITIES)},
        features=world.features,
        word_bags=world.words,
        train_noise=train_noise,
        split_seed=params.split_seed,
        parameters=parameters,
    )


def parse_synthetic_spec(body: str, spec: str) -> tuple[str, dict[str, object]]:
    """The preset and typed overrides of ``synthetic:<preset>[?k=v&...]`` (``body`` is the spec after the colon).

    Raises:
        DatasetError: unknown preset, unknown override key (the message lists the valid ones), a value of the
            wrong type, or a key given twice.
    """
    preset, _, query = body.partition("?")
    if preset not in PRESETS:
        raise DatasetError(spec, f"unknown synthetic preset {preset!r}", f"one of {', '.join(PRESETS)}")
    options: dict[str, object] = {}
    try:
        items = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise DatasetError(spec, f"malformed parameters {query!r}", "key=value pairs joined by &") from None
    for key, value in items:
        if key in options:
            raise DatasetError(spec, f"parameter {key!r} given twice", "each parameter once")
        options[key] = coerce_override(key, value, spec)
    return preset, options


@register_format("synthetic", scheme="synthetic", parse=parse_synthetic_spec, looks_like="synthetic:<preset>",
                 order=30)
def load_synthetic_spec(
    preset: str,
    options: Mapping[str, object],
    *,
    num_users: int | None = None,
    num_items: int | None = None,
    drop_leaking_pairs: bool = False,
    split_seed: int = 0,
) -> RecDataset:
    """Generate the dataset of a ``synthetic:<preset>[?k=v&...]`` spec (:func:`generate_synthetic`, its overrides).

    Sizes come as overrides (``users=``, ``items=``), so ``num_users`` / ``num_items`` are refused; a generated
    dataset has no leaking pairs to drop. ``split_seed`` applies unless the spec sets its own.
    """
    if num_users is not None or num_items is not None:
        raise DatasetError(f"synthetic:{preset}", "format / num_users / num_items apply to directories only",
                           "synthetic sizes as overrides, e.g. synthetic:tiktok?users=2000&items=5000")
    overrides = dict(options)
    if split_seed != 0:  # the default stays out of the dataset's name
        overrides.setdefault("split_seed", split_seed)
    return generate_synthetic(preset, **overrides)
