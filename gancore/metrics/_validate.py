"""Input checks shared by the feature-space metrics."""

import numpy as np


def as_features(features: np.ndarray, name: str) -> np.ndarray:
    """`features` as a float64 (N, D) array with N >= 2."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(
            f"{name} has N={array.shape[0]} samples of feature dim D={array.shape[1]}; at least 2 are needed "
            f"to estimate statistics, and N well above D for a non-singular covariance: pass more samples"
        )
    return array


def check_same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
