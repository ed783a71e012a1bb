"""Sample-quality metrics, computed as pure functions of feature arrays."""

from gancore.metrics.bootstrap import estimate_with_interval, one_sample_bootstrap_interval
from gancore.metrics.conditional import conditional_accuracy
from gancore.metrics.features import extract
from gancore.metrics.fid import fid, frechet_distance, gaussian_statistics
from gancore.metrics.inception import (InceptionFeatures, TorchScriptFeatures, encoder_features, load_encoder)
from gancore.metrics.inception_score import inception_score
from gancore.metrics.kid import kid
from gancore.metrics.prdc import coverage, density, density_coverage, precision, precision_recall, recall
from gancore.metrics.registry import SET_METRICS, MetricSettings, SetMetric, measure, measure_all, metric_entry

__all__ = [
    "SET_METRICS",
    "InceptionFeatures",
    "MetricSettings",
    "SetMetric",
    "TorchScriptFeatures",
    "conditional_accuracy",
    "coverage",
    "density",
    "density_coverage",
    "encoder_features",
    "estimate_with_interval",
    "extract",
    "fid",
    "frechet_distance",
    "gaussian_statistics",
    "inception_score",
    "kid",
    "load_encoder",
    "measure",
    "measure_all",
    "metric_entry",
    "one_sample_bootstrap_interval",
    "precision",
    "precision_recall",
    "recall",
]
