"""An image threshold on a false-alarm budget, from defect-free images alone.

Of m held-out normal images, k score at or above a threshold t. The false-alarm rate p of t on new
normal images is then bounded, with confidence 1 - α, by the exact binomial (Clopper-Pearson) upper
bound: the p at which k or fewer alarms in m images has probability α. `budget_threshold` takes the
lowest threshold (the most defects caught) whose bound is within the budget; with too few held-out
images no threshold is (even k = 0 leaves 1 - α^(1/m) above the budget), and the error says how many
images would be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95  # of the upper bound: α = 0.05


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact to float64 rounding)."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """The exact upper confidence bound of a rate seen k times in n trials: the p with
    P(X <= k | n, p) = 1 - confidence (1 for k = n), found by bisection to float64 precision."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == n:
        return 1.0
    alpha = 1 - confidence
    low, high = k / n, 1.0  # the CDF falls from above alpha (at the estimate) to 0 (at 1)
    for _ in range(200):
        middle = (low + high) / 2
        if binomial_cdf(k, n, middle) > alpha:
            low = middle
        else:
            high = middle
        if high - low <= 1e-15:
            break
    return high


def images_needed(budget: float, confidence: float = CONFIDENCE) -> int:
    """The fewest held-out normal images for which no alarm at all certifies `budget`."""
    return math.ceil(math.log(1 - confidence) / math.log1p(-budget))


@dataclass(frozen=True)
class BudgetThreshold:
    threshold: float  # an image is an alarm when its score is at or above it
    held_out_alarms: int  # k: held-out normal images at or above it
    n_held_out: int  # m
    bound: float  # the upper confidence bound of its false-alarm rate


def budget_threshold(normal_scores, budget: float, confidence: float = CONFIDENCE) -> BudgetThreshold:
    """The lowest threshold whose false-alarm bound, from these held-out normal scores, is at most
    `budget`. ValueError, saying how many images would do, when there are too few."""
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())[::-1]  # highest first
    m = len(scores)
    if m == 0 or clopper_pearson_upper(0, m, confidence) > budget:
        raise ValueError(f"a false-alarm rate of {budget:g} needs at least {images_needed(budget, confidence)} "
                         f"held-out normal images (at {confidence:.0%} confidence), this fit holds out {m}: "
                         f"add defect-free training images, raise the hold-out fraction, or raise the budget")
    k = 0
    while k + 1 < m and clopper_pearson_upper(k + 1, m, confidence) <= budget:
        k += 1
    # k alarms: the threshold is the k-th highest score, unless it ties the (k+1)-th (then the
    # threshold must go above both, which leaves fewer alarms)
    while k > 0 and scores[k - 1] == scores[k]:
        k -= 1
    threshold = float(scores[k - 1]) if k else float(np.nextafter(scores[0], np.inf))
    return BudgetThreshold(threshold, k, m, clopper_pearson_upper(k, m, confidence))
