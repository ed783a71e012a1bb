import math

import numpy as np
import pytest
import torch

from gancore.health import (
    DivergenceError,
    ModeCollapseError,
    TrainingHealthError,
    check_finite,
    check_gradient_norm,
    check_mode_collapse,
    class_coverage,
    class_diversity,
    diversity_ratio,
    gradient_norm,
)
from gancore.metrics import conditional_accuracy
from gancore.step import requested_labels


def _normal(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def test_errors_are_training_health_errors():
    assert issubclass(DivergenceError, TrainingHealthError) and issubclass(ModeCollapseError, TrainingHealthError)
    assert issubclass(TrainingHealthError, RuntimeError)


def test_check_finite_passes_finite_values():
    check_finite(10, {"loss_d": 1.3, "loss_g": -0.7, "d_real": 0.0})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_key_step_and_remedy(bad):
    with pytest.raises(DivergenceError) as error:
        check_finite(1234, {"loss_d": 0.5, "loss_g": bad})
    message = str(error.value)
    assert "loss_g" in message and "1234" in message and "loss_d" not in message
    assert "learning rate" in message and "checkpoint" in message


def test_gradient_norm_matches_hand_computation():
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.bias.zero_()
    layer(torch.tensor([[3.0, 4.0]])).sum().backward()
    # d(w.x + b)/dw = x = (3, 4), d/db = 1: total norm sqrt(9 + 16 + 1).
    assert gradient_norm(layer.parameters()) == pytest.approx(math.sqrt(26.0))


def test_gradient_norm_is_zero_without_gradients():
    assert gradient_norm(torch.nn.Linear(2, 1).parameters()) == 0.0


def test_check_gradient_norm():
    check_gradient_norm(5, "generator", 9.9, max_norm=10.0)
    with pytest.raises(DivergenceError, match=r"exploding gradients at step 5: discriminator .*12\.5.*10"):
        check_gradient_norm(5, "discriminator", 12.5, max_norm=10.0)
    with pytest.raises(DivergenceError, match="exploding gradients"):
        check_gradient_norm(5, "generator", math.nan, max_norm=10.0)
    with pytest.raises(DivergenceError, match="exploding gradients"):
        check_gradient_norm(5, "generator", math.inf, max_norm=10.0)


def test_class_coverage_extremes_and_order():
    uniform = np.repeat(np.arange(10), 7)
    assert class_coverage(uniform, 10) == pytest.approx(1.0)
    assert class_coverage(np.full(50, 3), 10) == 0.0
    skewed = np.array([0] * 90 + [1] * 10)
    # Two classes at 0.9/0.1 out of four: entropy / log 4.
    expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(4)
    assert class_coverage(skewed, 4) == pytest.approx(expected)
    assert 0.0 < expected < 1.0
    assert class_coverage(np.random.default_rng(0).permutation(skewed), 4) == pytest.approx(expected)


def test_class_coverage_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_coverage(np.array([0, 1, 3]), 3)
    with pytest.raises(ValueError, match="integer"):
        class_coverage(np.array([0.0, 1.0]), 3)


def test_diversity_ratio_known_answer():
    # Fake distances 1, 3, 2 (mean 2); the single real distance is 4.
    fake = np.array([[0.0], [1.0], [3.0]])
    real = np.array([[0.0], [4.0]])
    assert diversity_ratio(fake, real) == pytest.approx(0.5)


def test_diversity_ratio_same_distribution_is_about_one():
    assert diversity_ratio(_normal(500, 16, 0), _normal(500, 16, 1)) == pytest.approx(1.0, abs=0.02)


def test_diversity_ratio_collapsed_fakes_is_about_zero():
    collapsed = _normal(1, 16, 0) + 1e-6 * _normal(300, 16, 1)
    assert diversity_ratio(collapsed, _normal(300, 16, 2)) < 1e-5


def test_diversity_ratio_is_scale_invariant():
    fake, real = 0.5 * _normal(200, 8, 0), _normal(200, 8, 1)
    ratio = diversity_ratio(fake, real)
    assert ratio == pytest.approx(0.5, abs=0.05)
    assert diversity_ratio(1000.0 * fake, 1000.0 * real) == pytest.approx(ratio, rel=1e-9)


def test_diversity_ratio_subsampled_pairs():
    fake, real = 0.5 * _normal(400, 8, 0), _normal(400, 8, 1)
    full = diversity_ratio(fake, real)
    subsampled = diversity_ratio(fake, real, max_pairs=5000, seed=3)
    assert subsampled != full and subsampled == pytest.approx(full, rel=0.05)
    assert diversity_ratio(fake, real, max_pairs=5000, seed=3) == subsampled
    assert diversity_ratio(fake, real, max_pairs=400 * 399 // 2) == pytest.approx(full)


def test_check_mode_collapse_passes_above_thresholds():
    check_mode_collapse(100, coverage=0.95, diversity=0.8, min_coverage=0.9, min_diversity=0.5)


@pytest.mark.parametrize("coverage, diversity, within_class, accuracy", [
    (0.42, 0.8, 0.7, None), (0.95, 0.13, 0.7, None), (0.95, math.nan, 0.7, None), (0.95, 0.8, 0.02, None),
    (0.95, 0.8, math.nan, 0.9), (0.95, 0.8, 0.7, 0.11),
])
def test_check_mode_collapse_reports_numbers_and_advice(coverage, diversity, within_class, accuracy):
    with pytest.raises(ModeCollapseError) as error:
        check_mode_collapse(777, coverage=coverage, diversity=diversity, min_coverage=0.9, min_diversity=0.5,
                            class_diversity=within_class, conditional_accuracy=accuracy, min_conditional_accuracy=0.6)
    assert isinstance(error.value, TrainingHealthError)
    message = str(error.value)
    assert "777" in message and f"{coverage:.3f}" in message and f"{diversity:.3f}" in message
    assert f"within-class diversity ratio {within_class:.3f}" in message
    assert "0.900" in message and "0.500" in message
    assert ("conditional accuracy" in message) == (accuracy is not None), "an unconditional model has none"
    assert "minibatch discrimination" in message and "DiffAugment" in message
    assert "train.health.min_diversity" in message and "train.health.min_conditional_accuracy" in message
    assert ("class folders" in message) == (accuracy == 0.11), "label advice only when labels are ignored"


# A feature space with 10 well-separated classes (unit spread around each centre) and a featurenet that
# recognises them: the setting in which the collapse check must tell healthy from degenerate generators.
CLASSES, DIM = 10, 8
CENTRES = 6.0 * _normal(CLASSES, DIM, 100)


def _images_of(labels: np.ndarray, seed: int) -> np.ndarray:
    """Features of fresh images of these classes."""
    return CENTRES[labels] + _normal(len(labels), DIM, seed)


def _featurenet_classes(features: np.ndarray) -> np.ndarray:
    return np.linalg.norm(features[:, None] - CENTRES[None], axis=2).argmin(axis=1)


def _collapse_check(fakes: np.ndarray, conditional: bool) -> dict[str, float]:
    """The worker's evaluation and check with params.yaml's limits; returns the measures (raises on collapse).

    Fakes are grouped by the label they were asked for when conditional, by featurenet's class otherwise."""
    real_labels = np.arange(1000) % CLASSES
    reals = _images_of(real_labels, seed=1)
    predicted = _featurenet_classes(fakes)
    requested = requested_labels(len(fakes), CLASSES).numpy() if conditional else None
    measures = {
        "coverage": class_coverage(predicted, CLASSES), "diversity": diversity_ratio(fakes, reals),
        "class_diversity": class_diversity(fakes, predicted if requested is None else requested, reals, real_labels),
        "conditional_accuracy": None if requested is None else conditional_accuracy(predicted, requested),
    }
    check_mode_collapse(500, min_coverage=0.3, min_diversity=0.25, min_conditional_accuracy=0.5, **measures)
    return measures


@pytest.mark.parametrize("conditional", [True, False])
def test_healthy_generator_passes(conditional):
    labels = requested_labels(500, CLASSES).numpy()
    measures = _collapse_check(_images_of(labels, seed=2), conditional)
    assert measures["class_diversity"] == pytest.approx(1.0, abs=0.3)
    assert measures["conditional_accuracy"] in (None, pytest.approx(1.0, abs=0.02))


@pytest.mark.parametrize("conditional", [True, False])
def test_one_fixed_image_per_class_is_collapse(conditional):
    """Every class present and the samples far apart overall: only diversity within a class shows the collapse."""
    fixed_per_class = CENTRES[requested_labels(500, CLASSES).numpy()]
    labels = _featurenet_classes(fixed_per_class)
    assert class_coverage(labels, CLASSES) > 0.99 and diversity_ratio(fixed_per_class, _images_of(labels, 1)) > 0.8
    with pytest.raises(ModeCollapseError, match=r"within-class diversity ratio 0\.000 \(min 0\.250\)"):
        _collapse_check(fixed_per_class, conditional)


def test_conditional_generator_that_ignores_its_labels_is_collapse():
    """Diverse, realistic samples of every class, but not of the class asked for: accuracy near chance."""
    ignored = _images_of(np.random.default_rng(3).integers(0, CLASSES, 500), seed=4)
    with pytest.raises(ModeCollapseError, match=r"conditional accuracy 0\.\d+ \(min 0\.500\)") as error:
        _collapse_check(ignored, conditional=True)
    accuracy = float(str(error.value).split("conditional accuracy ")[1].split()[0])
    assert accuracy == pytest.approx(1 / CLASSES, abs=0.05)
    assert "within-class" in str(error.value) and "class folders" in str(error.value)
    _collapse_check(ignored, conditional=False)  # the same samples from an unconditional model are healthy


def test_class_diversity_is_the_least_diverse_class():
    reals, real_labels = _images_of(np.arange(200) % 2, seed=5), np.arange(200) % 2
    fakes, fake_labels = _images_of(np.arange(200) % 2, seed=6), np.arange(200) % 2
    fakes[fake_labels == 1] = CENTRES[1] + 0.5 * (fakes[fake_labels == 1] - CENTRES[1])  # class 1 half as spread
    assert class_diversity(fakes, fake_labels, reals, real_labels) == pytest.approx(0.5, abs=0.05)


def test_class_diversity_skips_classes_with_too_few_samples():
    reals, real_labels = _images_of(np.arange(100) % 2, seed=7), np.arange(100) % 2
    fake_labels = np.array([0] * 30 + [1] * 2)
    fakes = _images_of(fake_labels, seed=8)
    fakes[30:] = CENTRES[1]  # two identical samples of class 1: too few to judge
    assert class_diversity(fakes, fake_labels, reals, real_labels) == pytest.approx(1.0, abs=0.2)
    assert class_diversity(fakes, fake_labels, reals, real_labels, min_per_class=2) < 1e-6
    assert math.isnan(class_diversity(fakes, fake_labels, reals, real_labels, min_per_class=40))


def test_class_diversity_rejects_mismatched_labels():
    features = _normal(10, 4, 0)
    with pytest.raises(ValueError, match="fake_classes"):
        class_diversity(features, np.zeros(9, dtype=int), features, np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match="real_classes"):
        class_diversity(features, np.zeros(10, dtype=int), features, np.zeros(10))
