import math

import numpy as np
import pytest

from gancore.metrics import (
    estimate_with_interval,
    coverage,
    density,
    density_coverage,
    precision,
    precision_recall,
    recall,
)


def _normal(n: int, d: int, seed: int, mean: float | np.ndarray = 0.0, scale: float = 1.0) -> np.ndarray:
    return mean + scale * np.random.default_rng(seed).standard_normal((n, d))


def _brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float, float, float]:
    """Double-loop transcription of the clovaai/generative-evaluation-prdc definitions."""

    def radii(points):
        return [sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]

    real_radii, fake_radii = radii(real), radii(fake)
    in_real_ball = [[math.dist(r, f) < real_radii[i] for f in fake] for i, r in enumerate(real)]
    in_fake_ball = [[math.dist(r, f) < fake_radii[j] for j, f in enumerate(fake)] for r in real]
    precision_value = sum(any(row[j] for row in in_real_ball) for j in range(len(fake))) / len(fake)
    recall_value = sum(any(row) for row in in_fake_ball) / len(real)
    density_value = sum(sum(row) for row in in_real_ball) / len(fake) / k
    coverage_value = sum(any(row) for row in in_real_ball) / len(real)
    return precision_value, recall_value, density_value, coverage_value


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force_reference(k):
    real, fake = _normal(40, 5, 0), _normal(30, 5, 1, mean=0.8)
    expected = _brute_force_prdc(real, fake, k)
    assert (*precision_recall(real, fake, k), *density_coverage(real, fake, k)) == expected
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1 and 0 < expected[3] < 1  # not a degenerate case


def test_identical_sets_are_perfect():
    x = _normal(300, 8, 2)
    assert precision_recall(x, x) == (1.0, 1.0)
    # Each real ball holds itself and its k-1 nearer neighbours: exactly k fakes per ball.
    assert density_coverage(x, x) == (1.0, 1.0)


def test_same_distribution_density_one_and_coverage_closed_form():
    n, m, k = 1000, 1000, 5
    real, fake = _normal(n, 8, 3), _normal(m, 8, 4)
    density_value, coverage_value = density_coverage(real, fake, k)
    expected_coverage = 1.0 - np.prod([(n - i) / (n + m - i) for i in range(1, k + 1)])  # Naeem et al., Lemma 2
    assert density_value == pytest.approx(1.0, abs=0.1)
    assert coverage_value == pytest.approx(expected_coverage, abs=0.02)


def test_far_apart_sets_score_zero():
    real, fake = _normal(200, 4, 5), _normal(200, 4, 6, mean=100.0)
    assert precision_recall(real, fake) == (0.0, 0.0)
    assert density_coverage(real, fake) == (0.0, 0.0)


def test_fakes_from_one_of_two_modes():
    separation = np.array([20.0, 0.0])
    real = np.concatenate([_normal(500, 2, 7), _normal(500, 2, 8, mean=separation)])
    fake = _normal(500, 2, 9)
    precision_value, recall_value = precision_recall(real, fake)
    density_value, coverage_value = density_coverage(real, fake)
    assert precision_value > 0.9 and density_value == pytest.approx(1.0, abs=0.1)
    assert 0.45 <= recall_value <= 0.5
    assert 0.45 <= coverage_value <= 0.5


def test_overspread_fakes_lose_precision_not_recall():
    real = _normal(1000, 8, 10)
    good, spread = _normal(1000, 8, 11), _normal(1000, 8, 11, scale=2.0)
    good_precision, good_recall = precision_recall(real, good)
    spread_precision, spread_recall = precision_recall(real, spread)
    assert spread_precision < 0.5 * good_precision
    assert spread_recall >= good_recall
    assert density(real, spread) < 0.5 * density(real, good)


def test_argument_order_is_real_then_fake():
    real, fake = _normal(200, 4, 12), _normal(150, 4, 13, scale=1.5)
    precision_value, recall_value = precision_recall(real, fake)
    assert precision_recall(fake, real) == (recall_value, precision_value)
    assert precision_value != recall_value


def test_translation_invariant_far_from_origin():
    # ||a||^2 + ||b||^2 - 2ab cancels catastrophically for large norms unless the features are centred first.
    real, fake = _normal(200, 8, 21), _normal(200, 8, 22, mean=0.3)
    offset = 1e7
    assert precision_recall(real + offset, fake + offset) == precision_recall(real, fake)
    assert density_coverage(real + offset, fake + offset) == density_coverage(real, fake)


def test_chunked_equals_unchunked():
    real, fake = _normal(203, 16, 14), _normal(151, 16, 15, mean=0.2)
    for k in (2, 5):
        whole = (*precision_recall(real, fake, k), *density_coverage(real, fake, k))
        for chunk_rows in (1, 7, 1000):
            chunked = (
                *precision_recall(real, fake, k, chunk_rows=chunk_rows),
                *density_coverage(real, fake, k, chunk_rows=chunk_rows),
            )
            assert chunked == whole
    with pytest.raises(ValueError, match="chunk_rows"):
        precision_recall(real, fake, chunk_rows=0)


def test_single_number_wrappers():
    real, fake = _normal(100, 4, 16), _normal(100, 4, 17, mean=0.5)
    assert (precision(real, fake), recall(real, fake)) == precision_recall(real, fake)
    assert (density(real, fake), coverage(real, fake)) == density_coverage(real, fake)
    assert (precision(real, fake, k=7), density(real, fake, k=7)) == (
        precision_recall(real, fake, 7)[0],
        density_coverage(real, fake, 7)[0],
    )


def test_too_few_samples_for_k():
    x = _normal(20, 3, 18)
    with pytest.raises(ValueError, match="real_features has N=3.*k=3"):
        precision_recall(x[:3], x, k=3)
    with pytest.raises(ValueError, match="fake_features has N=3.*k=3"):
        precision_recall(x, x[:3], k=3)
    with pytest.raises(ValueError, match="real_features has N=5.*k=5"):
        density_coverage(x[:5], x, k=5)
    with pytest.raises(ValueError, match="k must be"):
        density_coverage(x, x, k=0)
    # Density and coverage give fakes no radius, so fewer fakes than k is fine.
    density_value, coverage_value = density_coverage(x, x[:3], k=5)
    assert density_value > 0 and coverage_value >= 3 / 20  # each fake copies a real point, inside its own ball


def test_rejects_mismatched_dims_and_shapes():
    with pytest.raises(ValueError, match="dims"):
        precision_recall(_normal(20, 3, 0), _normal(20, 4, 1))
    with pytest.raises(ValueError, match="dims"):
        density_coverage(_normal(20, 3, 0), _normal(20, 4, 1))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        density_coverage(np.zeros(20), _normal(20, 1, 1))


def test_bootstrap_interval_separates_good_from_overspread_fakes():
    real = _normal(300, 4, 19)
    good, spread = _normal(300, 4, 20), _normal(300, 4, 20, scale=2.0)
    for metric in (precision, density):
        _, good_low, good_high = estimate_with_interval(metric, real, good, num_resamples=20)
        _, spread_low, spread_high = estimate_with_interval(metric, real, spread, num_resamples=20)
        assert good_low < good_high and spread_low < spread_high
        assert spread_high < good_low, metric.__name__
