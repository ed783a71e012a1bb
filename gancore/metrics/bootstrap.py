"""Percentile bootstrap confidence intervals for two-sample and one-sample metrics."""

from typing import Callable

import numpy as np


def estimate_with_interval(
    metric: Callable[[np.ndarray, np.ndarray], float],
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_resamples: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """`metric(a, b)` and its bias-corrected percentile interval over resamples of both sets (with replacement).

    Resampling duplicates points, which inflates distances such as FID; the percentiles are
    shifted by that bootstrap bias (mean of resamples minus the full-sample value) so the
    interval describes the reported estimate rather than a smaller effective N.
    """
    _check_settings(num_resamples, confidence)
    a, b = np.asarray(features_a), np.asarray(features_b)
    rng = np.random.default_rng(seed)
    values = [
        metric(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
        for _ in range(num_resamples)
    ]
    estimate = metric(a, b)
    return (estimate, *_bias_corrected_percentiles(values, estimate, confidence))


def one_sample_bootstrap_interval(
    metric: Callable[[np.ndarray], float],
    samples: np.ndarray,
    num_resamples: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bias-corrected percentile interval of `metric` over resamples (with replacement) of the rows of
    `samples`; pass row indices to resample paired arrays (e.g. predictions and their labels) together."""
    _check_settings(num_resamples, confidence)
    rows = np.asarray(samples)
    rng = np.random.default_rng(seed)
    values = [metric(rows[rng.integers(0, len(rows), len(rows))]) for _ in range(num_resamples)]
    return _bias_corrected_percentiles(values, metric(rows), confidence)


def _check_settings(num_resamples: int, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}")


def _bias_corrected_percentiles(values: list[float], estimate: float, confidence: float) -> tuple[float, float]:
    bias = float(np.mean(values)) - estimate
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail]) - bias
    return float(low), float(high)
