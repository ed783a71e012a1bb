"""Sample-quality metrics, computed as pure functions of feature arrays."""

from gancore.metrics.bootstrap import bootstrap_interval
from gancore.metrics.features import extract
from gancore.metrics.fid import fid, frechet_distance, gaussian_statistics
from gancore.metrics.inception_score import inception_score
from gancore.metrics.kid import kid

__all__ = [
    "bootstrap_interval",
    "extract",
    "fid",
    "frechet_distance",
    "gaussian_statistics",
    "inception_score",
    "kid",
]
