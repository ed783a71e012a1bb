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
    diversity_ratio,
    gradient_norm,
)


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


@pytest.mark.parametrize("coverage, diversity", [(0.42, 0.8), (0.95, 0.13), (0.95, math.nan)])
def test_check_mode_collapse_reports_numbers_and_advice(coverage, diversity):
    with pytest.raises(ModeCollapseError) as error:
        check_mode_collapse(777, coverage=coverage, diversity=diversity, min_coverage=0.9, min_diversity=0.5)
    assert isinstance(error.value, TrainingHealthError)
    message = str(error.value)
    assert "777" in message and f"{coverage:.3f}" in message and f"{diversity:.3f}" in message
    assert "0.900" in message and "0.500" in message
    assert "minibatch discrimination" in message and "DiffAugment" in message
