"""Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel (Bińkowski et al., 2018)."""

import numpy as np

from gancore.metrics._validate import as_features, check_same_dim


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size samples x, y with k(u, v) = (u.v / d + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    # Dropping the diagonals of k_xx and k_yy (self-similarity) is what makes the estimate unbiased.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / m**2)


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean and standard deviation of MMD^2 over random subsets (drawn without replacement)."""
    a, b = as_features(features_a, "features_a"), as_features(features_b, "features_b")
    check_same_dim(a, b)
    m = min(subset_size, len(a), len(b))
    if m < 2 or num_subsets < 1:
        raise ValueError(f"KID needs subset_size >= 2 and num_subsets >= 1, got {m} and {num_subsets}")
    rng = np.random.default_rng(seed)
    values = [
        _polynomial_mmd2(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))
