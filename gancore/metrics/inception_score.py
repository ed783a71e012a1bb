"""Inception Score (Salimans et al., 2016) of class probabilities p(y|x)."""

import numpy as np
from scipy.special import xlogy


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over `splits` of exp(E_x KL(p(y|x) || p(y)))."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, K), got {probs.shape}")
    if not 1 <= splits <= len(probs):
        raise ValueError(f"splits must be in [1, N={len(probs)}], got {splits}")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs rows must be probability distributions (softmax outputs, not logits)")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # xlogy makes 0 * log(0) = 0 for classes a sample gives no mass to.
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
