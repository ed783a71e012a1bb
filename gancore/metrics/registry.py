"""The sample-set metrics by name, composed in one place.

Every metric takes (samples, reference) features, in that order, and `measure` returns its value and
its bootstrap interval from one call. The evaluate stage, the benchmarks and the registry gate read
names, directions and ranges from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gancore.metrics.bootstrap import estimate_with_interval
from gancore.metrics.fid import fid
from gancore.metrics.kid import kid
from gancore.metrics.prdc import coverage, density, precision, recall


@dataclass(frozen=True)
class MetricSettings:
    """How the metrics are computed (the eval.* params of the same names)."""

    kid_subsets: int
    kid_subset_size: int
    precision_recall_k: int
    density_coverage_k: int
    bootstrap_resamples: int
    seed: int


@dataclass(frozen=True)
class SetMetric:
    compute: Callable[[np.ndarray, np.ndarray, MetricSettings], float]  # (samples, reference, settings)
    lower_is_better: bool
    bounds: tuple[float, float] = (-np.inf, np.inf)  # the range an interval is clipped to

    def better(self, candidate: float, holder: float) -> bool:
        return candidate < holder if self.lower_is_better else candidate > holder


def _kid(samples: np.ndarray, reference: np.ndarray, settings: MetricSettings) -> float:
    return kid(samples, reference, num_subsets=settings.kid_subsets, subset_size=settings.kid_subset_size,
               seed=settings.seed)[0]


# The manifold metrics are defined as (real, fake): the registry passes (reference, samples).
SET_METRICS: dict[str, SetMetric] = {
    "fid": SetMetric(lambda samples, reference, _: fid(samples, reference), lower_is_better=True),
    "kid": SetMetric(_kid, lower_is_better=True),
    "precision": SetMetric(lambda samples, reference, settings: precision(reference, samples,
                                                                          k=settings.precision_recall_k),
                           lower_is_better=False, bounds=(0.0, 1.0)),
    "recall": SetMetric(lambda samples, reference, settings: recall(reference, samples, k=settings.precision_recall_k),
                        lower_is_better=False, bounds=(0.0, 1.0)),
    "density": SetMetric(lambda samples, reference, settings: density(reference, samples,
                                                                      k=settings.density_coverage_k),
                         lower_is_better=False, bounds=(0.0, np.inf)),
    "coverage": SetMetric(lambda samples, reference, settings: coverage(reference, samples,
                                                                        k=settings.density_coverage_k),
                          lower_is_better=False, bounds=(0.0, 1.0)),
}


def metric_entry(value: float, interval: tuple[float, float], n: int,
                 bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict:
    """One metric as stored: its value, N, and its 95% interval clipped to the metric's range."""
    return {"value": value, "ci95_low": max(interval[0], bounds[0]), "ci95_high": min(interval[1], bounds[1]), "n": n}


def measure(name: str, samples: np.ndarray, reference: np.ndarray, settings: MetricSettings) -> dict:
    """SET_METRICS[name] of `samples` against `reference`, with N and a 95% bootstrap interval."""
    metric = SET_METRICS[name]
    value, *interval = estimate_with_interval(lambda a, b: metric.compute(a, b, settings), samples, reference,
                                              num_resamples=settings.bootstrap_resamples, seed=settings.seed)
    return metric_entry(value, tuple(interval), len(samples), metric.bounds)


def measure_all(samples: np.ndarray, reference: np.ndarray, settings: MetricSettings) -> dict[str, dict]:
    """Every SET_METRICS entry, in registry order."""
    return {name: measure(name, samples, reference, settings) for name in SET_METRICS}
