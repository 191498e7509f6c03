"""Significance and improvement for the comparison tables (``docs/protocol.md``, "Significance").

GRCN's improvement over the strongest baseline gets a star when it is significant at ``ALPHA`` = 0.05:

- **two or more seeds** (an intersection-union test): the paired two-sided t-test over users is run on each seed
  that both rows share (seeds paired by number), and the star needs p < 0.05 with a positive mean difference on
  **every** seed. The reported p is the largest over the seeds, which is the intersection-union test's p-value. A
  seed where the training happened to favour the baseline removes the star, so seed-to-seed variance counts; the
  test is conservative (each seed alone has the level ``ALPHA``);
- **one seed**: the paired t-test over the users of that seed. Users are then the only unit of replication: the star
  reflects the sampling of users, not the variance of training, and the report says so.

A row without seeds (a fixed reference ranking such as popularity) does not depend on the seed: it is paired with
every seed of the other row. The Wilcoxon signed-rank test, which does not assume normal differences (per-user
Recall@10 is far from normal), is reported alongside (its largest p over the seeds); it does not decide the star.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


@dataclass(frozen=True)
class PairedTest:
    """Paired comparison of ``a`` against ``b`` over the users both were evaluated on.

    ``mean_difference`` is mean(a - b); p-values are two-sided (1.0 when every difference is zero; NaN when a test
    cannot be computed).
    """

    n: int
    mean_difference: float
    t_statistic: float
    p_ttest: float
    p_wilcoxon: float

    def significant(self, alpha: float = ALPHA) -> bool:
        """``a`` is better than ``b`` and the t-test rejects equality at ``alpha``."""
        return self.mean_difference > 0 and not math.isnan(self.p_ttest) and self.p_ttest < alpha


def align(users_a: np.ndarray, values_a: np.ndarray, users_b: np.ndarray, values_b: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """The two value arrays restricted to their common users, in the same user order."""
    common, index_a, index_b = np.intersect1d(users_a, users_b, assume_unique=True, return_indices=True)
    return np.asarray(values_a, np.float64)[index_a], np.asarray(values_b, np.float64)[index_b]


def paired_test(users_a: np.ndarray, values_a: np.ndarray, users_b: np.ndarray, values_b: np.ndarray
                ) -> PairedTest | None:
    """Paired two-sided t-test (``scipy.stats.ttest_rel``) and Wilcoxon signed-rank test of ``a`` against ``b``.

    ``None`` when fewer than two users are common to both.
    """
    a, b = align(users_a, values_a, users_b, values_b)
    if a.size < 2:
        return None
    difference = a - b
    mean_difference = float(difference.mean())
    if not np.any(difference):
        return PairedTest(int(a.size), 0.0, 0.0, 1.0, 1.0)
    with warnings.catch_warnings():
        # A constant non-zero difference has zero variance: the t statistic is infinite and p is 0, which is right.
        warnings.simplefilter("ignore", RuntimeWarning)
        t = stats.ttest_rel(a, b)
        try:
            p_wilcoxon = float(stats.wilcoxon(a, b).pvalue)
        except ValueError:
            p_wilcoxon = math.nan
    p_ttest = float(t.pvalue)
    if math.isnan(p_ttest) and np.all(difference == difference[0]):
        p_ttest = 0.0
    return PairedTest(int(a.size), mean_difference, float(t.statistic), p_ttest, p_wilcoxon)


Sample = tuple[np.ndarray, np.ndarray]  # (users, per-user values)


@dataclass(frozen=True)
class SeedTest:
    """The test behind one star: a :class:`PairedTest` of ``a`` against ``b`` per tested seed.

    ``seeds`` are the seed numbers tested (empty when neither row has seeds; then ``per_seed`` holds one test).
    With two or more tests the star is an intersection-union test (every seed must be significant); with one it is
    the per-user test alone.
    """

    seeds: tuple[int, ...]
    per_seed: tuple[PairedTest, ...]

    @property
    def intersection_union(self) -> bool:
        return len(self.per_seed) >= 2

    @property
    def n(self) -> int:
        """Users in the test (the smallest number over the seeds)."""
        return min(t.n for t in self.per_seed)

    @property
    def mean_difference(self) -> float:
        """mean(a - b) over users, averaged over the seeds."""
        return float(np.mean([t.mean_difference for t in self.per_seed]))

    @property
    def min_difference(self) -> float:
        """The smallest per-seed mean difference (a negative one rules out the star)."""
        return min(t.mean_difference for t in self.per_seed)

    @property
    def p_ttest(self) -> float:
        """The largest per-seed t-test p-value: the intersection-union p (with one seed, that seed's p)."""
        return _largest(t.p_ttest for t in self.per_seed)

    @property
    def p_wilcoxon(self) -> float:
        """The largest per-seed Wilcoxon p-value (reported alongside; it does not decide the star)."""
        return _largest(t.p_wilcoxon for t in self.per_seed)

    @property
    def p_per_seed(self) -> tuple[float, ...]:
        return tuple(t.p_ttest for t in self.per_seed)

    def significant(self, alpha: float = ALPHA) -> bool:
        """``a`` is better than ``b`` and the t-test rejects equality at ``alpha`` on every tested seed."""
        return all(t.significant(alpha) for t in self.per_seed)

    @property
    def description(self) -> str:
        """Which test produced the star, in a few words (the CSV records' ``significance_test``)."""
        if self.intersection_union:
            return f"paired t-test on every one of {len(self.per_seed)} seeds (intersection-union), max p"
        if self.seeds:
            return "paired t-test over users, 1 seed: reflects users only"
        return "paired t-test over users, no seeds: reflects users only"

    @property
    def explanation(self) -> str:
        """The same, in a sentence for a table's notes."""
        if self.intersection_union:
            return (f"paired two-sided t-test over per-user test metrics, run on each of the {len(self.per_seed)} "
                    "seeds both rows share; the star needs p < 0.05 and a gain on every seed (an intersection-union "
                    "test, so seed-to-seed training variance counts); p is the largest over the seeds")
        which = "one seed" if self.seeds else "rows without seeds"
        return (f"paired two-sided t-test over per-user test metrics of {which}, p < 0.05: the star reflects the "
                "sampling of users only, not seed-to-seed training variance")


def _largest(values) -> float:
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def seed_test(ours: Mapping[int, Sample] | Sample, theirs: Mapping[int, Sample] | Sample) -> SeedTest | None:
    """The significance test of ``ours`` against ``theirs`` (see the module docstring).

    Each side is either a mapping ``{seed: (users, values)}`` of per-user test values per seed, or one
    ``(users, values)`` pair for a row that does not depend on the seed (paired with every seed of the other side).
    Seeds are paired by number; only the seeds both sides have are tested. ``None`` when there is nothing to test:
    no seed in common, or fewer than two common users on a seed.
    """
    ours_by_seed = ours if isinstance(ours, Mapping) else None
    theirs_by_seed = theirs if isinstance(theirs, Mapping) else None
    if ours_by_seed is None and theirs_by_seed is None:
        seeds: tuple[int, ...] = ()
        pairs = [(ours, theirs)]
    else:
        if ours_by_seed is not None and theirs_by_seed is not None:
            seeds = tuple(sorted(set(ours_by_seed) & set(theirs_by_seed)))
        else:
            seeds = tuple(sorted(ours_by_seed if ours_by_seed is not None else theirs_by_seed))
        pairs = [(ours if ours_by_seed is None else ours_by_seed[seed],
                  theirs if theirs_by_seed is None else theirs_by_seed[seed]) for seed in seeds]
    tests = []
    for (users_a, values_a), (users_b, values_b) in pairs:
        test = paired_test(users_a, values_a, users_b, values_b)
        if test is None:
            return None
        tests.append(test)
    return SeedTest(seeds, tuple(tests)) if tests else None


def improvement(ours: float | None, best_other: float | None) -> float | None:
    """Relative improvement in percent, ``100 (ours - best_other) / best_other`` (the paper's ``%Improv.``)."""
    if ours is None or best_other is None or best_other == 0:
        return None
    return 100.0 * (ours - best_other) / best_other
