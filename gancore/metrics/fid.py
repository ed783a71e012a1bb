"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., 2017)."""

import numpy as np
from scipy import linalg

from gancore.metrics._validate import as_features, check_same_dim


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64."""
    array = as_features(features, "features")
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance, its rounding-negative eigenvalues clipped to 0."""
    values, vectors = linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^(1/2)) without a general matrix square root.

    sigma1 sigma2 is similar to the symmetric PSD matrix S = sigma1^(1/2) sigma2 sigma1^(1/2), so the trace is
    the sum of the square roots of S's eigenvalues. Symmetric eigendecompositions stay accurate when the
    covariances are singular (fewer samples than dimensions, collapsed samples), where scipy's sqrtm of the
    non-symmetric product warns and can return complex or inaccurate values; pytorch-fid then retries with
    eps * I added to both covariances, which changes the distance. Here nothing is added: the result is the
    exact value to rounding, for singular and regular covariances alike.
    """
    root = _psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    values = linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise ValueError("covariances hold NaN or infinity: the features are broken")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, D) feature sets."""
    a, b = as_features(features_a, "features_a"), as_features(features_b, "features_b")
    check_same_dim(a, b)
    return frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))
