"""Significance and improvement for the comparison tables (SPEC §5.1).

GRCN's improvement over the strongest baseline is marked significant when a paired two-sided t-test over the
per-user test metric (each user's value averaged across seeds) gives p < 0.05 and the mean difference favours GRCN.
The Wilcoxon signed-rank test, which does not assume normal differences (per-user Recall@10 is far from normal),
is reported alongside.
"""

from __future__ import annotations

import math
import warnings
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


def improvement(ours: float | None, best_other: float | None) -> float | None:
    """Relative improvement in percent, ``100 (ours - best_other) / best_other`` (the paper's ``%Improv.``)."""
    if ours is None or best_other is None or best_other == 0:
        return None
    return 100.0 * (ours - best_other) / best_other
