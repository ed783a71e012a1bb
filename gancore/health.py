"""Training health checks: divergence (non-finite losses, exploding gradients) and mode collapse
(too few classes, too little diversity over all samples or within a class, labels ignored).

The checks are pure functions that raise a TrainingHealthError subclass whose message names the
problem, the step, the numbers and what to try next.
"""

import math
from collections.abc import Iterable

import numpy as np
import torch

from gancore.metrics._validate import as_features, check_same_dim

_DIVERGENCE_ADVICE = (
    "lower the learning rates (lr_g, lr_d), stabilise D with a gradient penalty, spectral normalisation "
    "or the hinge loss, or resume from an earlier checkpoint"
)


class TrainingHealthError(RuntimeError):
    """A run that stopped for this reason must not be registered."""


class DivergenceError(TrainingHealthError):
    """Losses or gradients became non-finite or exploded."""


class ModeCollapseError(TrainingHealthError):
    """The generator covers too few classes, its samples are too similar, or they ignore their labels."""


def check_finite(step: int, values: dict[str, float]) -> None:
    """Raise DivergenceError if any value (e.g. a loss) is NaN or infinite."""
    bad = {key: value for key, value in values.items() if not math.isfinite(value)}
    if bad:
        listed = ", ".join(f"{key}={value}" for key, value in bad.items())
        raise DivergenceError(f"training diverged at step {step}: non-finite {listed}; {_DIVERGENCE_ADVICE}")


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """Total L2 norm of the gradients of `parameters` that have one; 0.0 if none has."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def gradient_norm_exceeded(norm: float, max_norm: float) -> bool:
    """True for a norm above `max_norm` or not finite (NaN compares false with everything)."""
    return not norm <= max_norm


def check_gradient_norm(step: int, name: str, norm: float, max_norm: float) -> None:
    """Raise DivergenceError if the gradient norm of `name` is non-finite or above `max_norm`."""
    if gradient_norm_exceeded(norm, max_norm):
        raise DivergenceError(
            f"exploding gradients at step {step}: {name} gradient norm {norm:.4g} is not finite or above "
            f"max_norm {max_norm:.4g}; {_DIVERGENCE_ADVICE}"
        )


def class_coverage(predicted_labels: np.ndarray, num_classes: int) -> float:
    """Entropy of the class histogram over log(num_classes): 1 for uniform classes, 0 for a single class."""
    labels = np.asarray(predicted_labels)
    if num_classes < 2:
        raise ValueError(f"class coverage needs num_classes >= 2, got {num_classes}")
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"predicted_labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"predicted_labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    frequencies = np.bincount(labels, minlength=num_classes) / labels.size
    frequencies = frequencies[frequencies > 0]
    entropy = -np.sum(frequencies * np.log(frequencies))
    # Clip rounding error at the uniform end.
    return float(np.clip(entropy / np.log(num_classes), 0.0, 1.0)) + 0.0  # + 0.0 turns -0.0 into 0.0


def _mean_pairwise_distance(features: np.ndarray, max_pairs: int | None, rng: np.random.Generator) -> float:
    n = len(features)
    if max_pairs is not None and n * (n - 1) // 2 > max_pairs:
        # i != j uniformly over ordered pairs; distance is symmetric, so also uniform over unordered pairs.
        first = rng.integers(0, n, max_pairs)
        second = (first + rng.integers(1, n, max_pairs)) % n
        return float(np.linalg.norm(features[first] - features[second], axis=1).mean())
    squared_norms = np.einsum("ij,ij->i", features, features)
    squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * features @ features.T
    np.fill_diagonal(squared, 0.0)
    return float(np.sqrt(np.maximum(squared, 0.0)).sum() / (n * (n - 1)))


def diversity_ratio(
    fake_features: np.ndarray, real_features: np.ndarray, max_pairs: int | None = None, seed: int = 0
) -> float:
    """Mean pairwise L2 distance among fakes over that among reals: about 1 as diverse as the data, 0 collapsed.

    All N(N-1)/2 pairs are used, or `max_pairs` random pairs (drawn with `seed`) when there are more.
    """
    fake, real = as_features(fake_features, "fake_features"), as_features(real_features, "real_features")
    check_same_dim(fake, real)
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 or None, got {max_pairs}")
    rng = np.random.default_rng(seed)
    real_distance = _mean_pairwise_distance(real, max_pairs, rng)
    if real_distance == 0.0:
        raise ValueError("all real features are identical, so the diversity ratio is undefined")
    return _mean_pairwise_distance(fake, max_pairs, rng) / real_distance


def class_diversity(
    fake_features: np.ndarray, fake_classes: np.ndarray, real_features: np.ndarray, real_classes: np.ndarray,
    min_per_class: int = 5,
) -> float:
    """The least diverse class: the minimum over classes of the diversity ratio within that class.

    Catches what the overall ratio misses: one fixed sample per class is diverse over all samples but
    collapsed within each class. Fakes are grouped by `fake_classes` (the label a conditional generator
    was asked for, or featurenet's predicted class), reals by their true labels; only classes with at
    least `min_per_class` samples on both sides count (fewer give a noisy ratio). NaN when none does
    (e.g. every sample falls in classes rare among the reals), which the collapse check fails.
    """
    fake, real = as_features(fake_features, "fake_features"), as_features(real_features, "real_features")
    fake_classes, real_classes = _class_labels(fake_classes, fake, "fake"), _class_labels(real_classes, real, "real")
    if min_per_class < 2:
        raise ValueError(f"min_per_class must be >= 2 (a distance needs a pair), got {min_per_class}")
    ratios = [
        diversity_ratio(fake[fake_classes == label], real[real_classes == label])
        for label in np.intersect1d(fake_classes, real_classes)
        if min(np.sum(fake_classes == label), np.sum(real_classes == label)) >= min_per_class
    ]
    return min(ratios, default=math.nan)


def _class_labels(labels: np.ndarray, features: np.ndarray, side: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.shape != (len(features),) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{side}_classes must be one integer label per {side} feature ({len(features)}), "
                         f"got {array.dtype} {array.shape}")
    return array


def check_mode_collapse(
    step: int, coverage: float, diversity: float, min_coverage: float, min_diversity: float,
    class_diversity: float | None = None, conditional_accuracy: float | None = None,
    min_conditional_accuracy: float = 0.0,
) -> None:
    """Raise ModeCollapseError if a measure is below its threshold (or NaN): class coverage, the diversity
    ratio over all samples and within the least diverse class (both against `min_diversity`), and a
    conditional generator's accuracy on its requested labels. None: not measured (an unconditional
    model has no conditional accuracy)."""
    measured = [("class coverage", coverage, min_coverage), ("diversity ratio", diversity, min_diversity),
                ("within-class diversity ratio", class_diversity, min_diversity),
                ("conditional accuracy", conditional_accuracy, min_conditional_accuracy)]
    measured = [(name, value, limit) for name, value, limit in measured if value is not None]
    if all(value >= limit for _, value, limit in measured):
        return
    numbers = ", ".join(f"{name} {value:.3f} (min {limit:.3f})" for name, value, limit in measured)
    ignores_labels = conditional_accuracy is not None and not conditional_accuracy >= min_conditional_accuracy
    raise ModeCollapseError(
        f"mode collapse at step {step}: {numbers}; try minibatch discrimination, a lower generator learning "
        f"rate (lr_g), DiffAugment or a different loss"
        + ("; for samples that ignore their labels, check that the data's class folders match their images, "
           "or give conditioning longer to develop (train.health.warmup_steps)" if ignores_labels else "")
        + "; the thresholds are the params train.health.min_class_coverage, train.health.min_diversity and "
        "train.health.min_conditional_accuracy"
    )
