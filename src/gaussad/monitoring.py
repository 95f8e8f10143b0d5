"""Drift watch: production scores against the held-out normal scores a model keeps.

Three tests, per window of images and over all of them:
  alarms:   k of n images at or above the decision threshold, against the rate normal images give
            (the false-alarm budget, or else the held-out images' rate at that threshold): the
            one-sided exact binomial p-value P(X >= k);
  scores:   the two-sample Kolmogorov-Smirnov statistic of the production scores against the
            held-out normal ones, with its asymptotic p-value (the Kolmogorov distribution);
  features: the same test on the mean of each image's anomaly map: every position's features under
            the model's own Gaussians, not only the worst one, so a shift of the whole image
            (lighting, focus) shows there before it moves the maxima. Only where both sides have
            map means (scores from a predictions.csv of an older gaussad have none).
A window drifts when the smallest p-value, times the number of tests (Bonferroni), is below
`alpha`; on unshifted images a window then drifts with probability at most about `alpha`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from gaussad.false_alarms import binomial_cdf

ALPHA = 0.01


def alarm_p_value(alarms: int, n: int, rate: float) -> float:
    """P(X >= alarms) for X ~ Binomial(n, rate): how surprising this many alarms is."""
    return 1.0 if alarms == 0 else max(0.0, 1.0 - binomial_cdf(alarms - 1, n, rate))


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """sup |F_a - F_b| of the two samples' empirical distribution functions."""
    a, b = np.sort(a), np.sort(b)
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def kolmogorov_sf(x: float) -> float:
    """P(K > x) of the Kolmogorov distribution: 2 Σ (-1)^(k-1) exp(-2 k² x²)."""
    if x < 0.2:  # the series converges slowly here, where the probability is 1 to float64 precision
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def ks_p_value(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(statistic, asymptotic two-sided p-value) of the two-sample Kolmogorov-Smirnov test."""
    d = ks_statistic(a, b)
    effective = len(a) * len(b) / (len(a) + len(b))
    return d, kolmogorov_sf(d * math.sqrt(effective))


@dataclass
class WindowTest:
    start: int  # the first image's index
    n_images: int
    alarms: int
    alarm_rate: float
    alarm_p_value: float
    ks_statistic: float
    ks_p_value: float
    feature_ks_statistic: float | None  # of the map means
    feature_p_value: float | None
    p_value: float  # the smallest of the tests', times their number (at most 1)
    drift: bool


def test_window(scores: np.ndarray, normal: np.ndarray, threshold: float, expected_rate: float, start: int = 0,
                alpha: float = ALPHA, map_means: np.ndarray | None = None,
                normal_map_means: np.ndarray | None = None) -> WindowTest:
    alarms = int((scores >= threshold).sum())
    alarm_p = alarm_p_value(alarms, len(scores), expected_rate)
    d, ks_p = ks_p_value(scores, normal)
    feature_d = feature_p = None
    if map_means is not None and normal_map_means is not None:
        feature_d, feature_p = ks_p_value(map_means, normal_map_means)
    p_values = [p for p in (alarm_p, ks_p, feature_p) if p is not None]
    p = min(1.0, len(p_values) * min(p_values))
    return WindowTest(start, len(scores), alarms, alarms / len(scores), alarm_p, d, ks_p, feature_d, feature_p, p,
                      p < alpha)


def expected_alarm_rate(normal: np.ndarray, threshold: float, budget: float | None) -> float:
    """The alarm rate normal images give at `threshold`: the false-alarm budget if the model has one,
    else the held-out images' rate at it, (k + 1) / (m + 2) so that it is never 0 or 1."""
    if budget is not None:
        return budget
    return (int((normal >= threshold).sum()) + 1) / (len(normal) + 2)


def monitor(scores, normal, threshold: float, budget: float | None = None, window: int | None = None,
            alpha: float = ALPHA, map_means=None, normal_map_means=None) -> dict:
    """monitor.json: the tests over all the scores (in arrival order) and per window of `window`
    images (the last one may be shorter), with the counts and rates they rest on; the feature test
    with the images' map means and the held-out ones."""
    scores, normal = np.asarray(scores, dtype=np.float64), np.asarray(normal, dtype=np.float64)
    if map_means is None or normal_map_means is None or len(normal_map_means) < 2:
        map_means = normal_map_means = None
    else:
        map_means, normal_map_means = np.asarray(map_means, np.float64), np.asarray(normal_map_means, np.float64)
    if len(scores) == 0:
        raise ValueError("no production scores to monitor")
    if len(normal) < 2:
        raise ValueError(f"the model keeps {len(normal)} held-out normal scores (models fitted before gaussad kept "
                         f"them keep none): fit it again, with a hold-out of at least 2 images")
    rate = expected_alarm_rate(normal, threshold, budget)
    overall = test_window(scores, normal, threshold, rate, 0, alpha, map_means, normal_map_means)
    size = window or len(scores)
    windows = [test_window(scores[i:i + size], normal, threshold, rate, i, alpha,
                           None if map_means is None else map_means[i:i + size], normal_map_means)
               for i in range(0, len(scores), size)]
    return {**asdict(overall), "expected_alarm_rate": rate, "threshold": threshold, "alpha": alpha,
            "n_normal_scores": len(normal), "window": window,
            "windows": [asdict(w) for w in windows], "drift_windows": [i for i, w in enumerate(windows) if w.drift]}
