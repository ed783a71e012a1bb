import warnings

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

from gancore.metrics import (
    estimate_with_interval,
    SET_METRICS,
    MetricSettings,
    conditional_accuracy,
    extract,
    fid,
    frechet_distance,
    gaussian_statistics,
    inception_score,
    kid,
    measure,
    measure_all,
    one_sample_bootstrap_interval,
)
from gancore.models.classifier import Classifier


def _normal(n: int, d: int, seed: int, mean: float | np.ndarray = 0.0, scale: float = 1.0) -> np.ndarray:
    return mean + scale * np.random.default_rng(seed).standard_normal((n, d))


def test_gaussian_statistics_float64():
    features = _normal(50, 3, 0).astype(np.float32)
    mu, sigma = gaussian_statistics(features)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.shape == (3,) and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False))


def test_frechet_distance_closed_form_diagonal():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_two_gaussians_matches_closed_form():
    d, shift, scale = 4, np.array([1.0, 0.5, 0.0, -0.5]), 2.0
    a = _normal(20_000, d, 1)
    b = _normal(20_000, d, 2, mean=shift, scale=scale)
    expected = shift @ shift + d * (1.0 - scale) ** 2  # N(0, I) vs N(m, s^2 I)
    assert fid(a, b) == pytest.approx(expected, abs=0.15)


def test_fid_of_identical_sets_is_zero():
    x = _normal(500, 8, 3)
    assert abs(fid(x, x)) < 1e-8
    assert fid(x, x + 1.0) == pytest.approx(8.0, rel=1e-8)


def test_fid_matches_torchmetrics():
    rng = np.random.default_rng(4)
    mixing = rng.standard_normal((16, 16))
    a = _normal(400, 16, 5) @ mixing
    b = _normal(400, 16, 6, mean=0.3) @ mixing.T
    stats = [torch.from_numpy(s) for s in (*gaussian_statistics(a), *gaussian_statistics(b))]
    assert fid(a, b) == pytest.approx(_compute_fid(*stats).item(), rel=1e-6)


@pytest.mark.parametrize("n", [0, 1])
def test_fid_too_few_samples(n):
    with pytest.raises(ValueError, match=f"N={n}.*D=4"):
        fid(np.zeros((n, 4)), _normal(10, 4, 0))
    with pytest.raises(ValueError, match="N=1"):
        fid(_normal(10, 4, 0), np.zeros((1, 4)))


def test_fid_with_fewer_samples_than_dims_is_finite_and_warning_free():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = fid(_normal(10, 32, 7), _normal(12, 32, 8, mean=1.0))
    assert np.isfinite(value) and value > 0


def test_fid_of_singular_covariances_is_exact_and_warning_free():
    """N < D gives rank-deficient covariances (a health check's 500 samples can collapse onto fewer dimensions).
    Shifting a set changes only the mean, so the exact FID is the squared shift; no eps is added to get it."""
    x = _normal(20, 64, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fid(x, x) == pytest.approx(0.0, abs=1e-5)  # 64 = the traces: 1e-5 is rounding
        assert fid(x, x + 1.0) == pytest.approx(64.0, abs=1e-5)


def test_fid_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="dims"):
        fid(_normal(10, 3, 0), _normal(10, 4, 0))


def test_kid_identical_sets_near_zero_and_shift_detected():
    x = _normal(1000, 8, 9)
    same, _ = kid(x, x, num_subsets=20, subset_size=200)
    shifted, shifted_std = kid(x, x + 0.3, num_subsets=20, subset_size=200)
    assert abs(same) < 0.05
    assert shifted > 0.2 and shifted > 4 * shifted_std


def test_kid_is_unbiased():
    # Many small subsets from one distribution: the unbiased MMD^2 averages to 0 and is often negative.
    a, b = _normal(20_000, 4, 10), _normal(20_000, 4, 11)
    values = [kid(a, b, num_subsets=1, subset_size=8, seed=s)[0] for s in range(400)]
    mean, stderr = np.mean(values), np.std(values) / np.sqrt(len(values))
    assert abs(mean) < 3 * stderr
    assert min(values) < 0


def test_kid_matches_torchmetrics():
    a, b = _normal(300, 16, 12), _normal(300, 16, 13, mean=0.2, scale=1.1)
    # Whole sets as the single subset: MMD^2 does not depend on sample order.
    mean, std = kid(a, b, num_subsets=1, subset_size=300)
    assert std == 0.0
    assert mean == pytest.approx(poly_mmd(torch.from_numpy(a), torch.from_numpy(b)).item(), rel=1e-9)


def test_kid_clips_subset_size_and_validates():
    a, b = _normal(30, 4, 0), _normal(20, 4, 1)
    assert kid(a, b, num_subsets=3, subset_size=1000) == kid(a, b, num_subsets=3, subset_size=20)
    with pytest.raises(ValueError):
        kid(a, b, subset_size=1)


def test_inception_score_extremes():
    k, splits = 5, 2
    one_hot = np.eye(k)[np.arange(20) % k]
    mean, std = inception_score(one_hot, splits=splits)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-12)
    identical = np.tile([0.1, 0.2, 0.3, 0.4], (12, 1))
    assert inception_score(identical, splits=3)[0] == pytest.approx(1.0)


def test_inception_score_hand_computed():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    kl = (np.log(1 / 0.75) + 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)) / 2
    assert inception_score(probs, splits=1)[0] == pytest.approx(np.exp(kl))


def test_inception_score_rejects_logits_and_bad_splits():
    with pytest.raises(ValueError, match="logits"):
        inception_score(np.array([[2.0, -1.0], [0.3, 0.1]]), splits=1)
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.eye(3), splits=4)


def test_bootstrap_interval_contains_point_estimate():
    a, b = _normal(1000, 2, 14), _normal(1000, 2, 15, mean=np.array([1.0, 0.0]))
    point = fid(a, b)
    _, low, high = estimate_with_interval(fid, a, b, num_resamples=100, seed=0)
    assert low < point < high
    assert high - low < 1.0
    assert estimate_with_interval(fid, a, b, num_resamples=100, seed=0)[1:] == (low, high)
    _, small_low, small_high = estimate_with_interval(fid, a[:100], b[:100], num_resamples=100, seed=0)
    assert small_high - small_low > high - low


def test_bootstrap_resamples_with_replacement():
    a = np.arange(10.0)[:, None]
    seen_duplicates = []
    estimate_with_interval(lambda x, y: seen_duplicates.append(len(np.unique(x)) < len(x)) or 0.0, a, a,
                           num_resamples=20)
    assert any(seen_duplicates)
    with pytest.raises(ValueError):
        estimate_with_interval(fid, a, a, confidence=1.5)


def test_extract_features_and_probs():
    torch.manual_seed(0)
    classifier = Classifier(1, 16, num_classes=3, feature_dim=8).train()
    images = torch.rand(10, 1, 16, 16) * 2 - 1
    features, probs = extract(classifier, images, batch_size=4)
    assert classifier.training  # previous mode restored
    assert features.dtype == np.float64 and features.shape == (10, 8)
    assert probs.dtype == np.float64 and probs.shape == (10, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    classifier.eval()
    with torch.no_grad():
        np.testing.assert_allclose(features, classifier.features(images).double().numpy(), rtol=1e-5, atol=1e-6)
        expected = torch.softmax(classifier(images).double(), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    extract(classifier, images)
    assert not classifier.training


def test_bootstrap_interval_is_bias_corrected_for_small_n():
    # Same distribution, N not far above D: duplicates from resampling inflate FID a lot.
    a, b = _normal(200, 32, 21), _normal(200, 32, 22)
    point = fid(a, b)
    _, low, high = estimate_with_interval(fid, a, b, num_resamples=50, seed=0)
    assert low <= point <= high, "the interval must describe the reported value, not a smaller effective N"


def test_conditional_accuracy_from_probabilities_or_classes():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])
    requested = np.array([0, 2, 0, 1])
    assert conditional_accuracy(probabilities, requested) == 0.5  # samples 0 and 1 show the class asked for
    assert conditional_accuracy(np.array([0, 2, 1, 0]), requested) == 0.5
    assert conditional_accuracy(np.log(probabilities), requested) == 0.5, "logits rank classes the same way"


def test_conditional_accuracy_of_a_generator_that_ignores_its_labels_is_chance():
    rng = np.random.default_rng(30)
    requested = np.arange(5000) % 10
    assert conditional_accuracy(rng.integers(0, 10, 5000), requested) == pytest.approx(0.1, abs=0.015)


def test_conditional_accuracy_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="requested labels"):
        conditional_accuracy(np.zeros((4, 3)), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="integers"):
        conditional_accuracy(np.zeros(4, dtype=int), np.zeros(4))


def test_one_sample_bootstrap_interval_of_an_accuracy():
    hits = np.random.default_rng(31).random(2000) < 0.3
    low, high = one_sample_bootstrap_interval(np.mean, hits, num_resamples=200, seed=0)
    standard_error = np.sqrt(0.3 * 0.7 / 2000)
    assert low < hits.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.25)
    assert one_sample_bootstrap_interval(np.mean, hits, num_resamples=200, seed=0) == (low, high)
    # Paired arrays resample together through their row indices.
    predicted, requested = np.where(hits, 3, 4), np.full(2000, 3)
    paired = one_sample_bootstrap_interval(lambda rows: conditional_accuracy(predicted[rows], requested[rows]),
                                           np.arange(2000), num_resamples=200, seed=0)
    assert paired == pytest.approx((low, high))
    with pytest.raises(ValueError):
        one_sample_bootstrap_interval(np.mean, hits, num_resamples=0)


SETTINGS = MetricSettings(kid_subsets=5, kid_subset_size=50, precision_recall_k=3, density_coverage_k=5,
                          bootstrap_resamples=20, seed=0)


def test_registry_metrics_take_samples_then_reference():
    """Samples from one half of the reference's spread: every sample is realistic (precision 1), but
    half of the reference is never reached (recall well below 1). Swapped arguments would say the opposite."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 2))
    samples = reference[reference[:, 0] > 0][:150] + 0.01 * rng.normal(size=(150, 2))
    scores = measure_all(samples, reference, SETTINGS)
    assert scores["precision"]["value"] > 0.95 and scores["recall"]["value"] < 0.7
    assert scores["coverage"]["value"] < 0.7
    assert set(scores) == set(SET_METRICS)


def test_measure_gives_the_value_with_its_interval_in_range():
    rng = np.random.default_rng(1)
    samples, reference = rng.normal(size=(200, 4)), rng.normal(0.5, 1.0, size=(200, 4))
    entry = measure("fid", samples, reference, SETTINGS)
    assert entry["value"] == pytest.approx(fid(samples, reference)) and entry["n"] == 200
    assert entry["ci95_low"] <= entry["value"] <= entry["ci95_high"]
    recall_entry = measure("recall", samples, reference, SETTINGS)
    assert 0.0 <= recall_entry["ci95_low"] <= recall_entry["ci95_high"] <= 1.0, "fractions are clipped to [0, 1]"


def test_registry_directions_decide_what_beats_what():
    assert SET_METRICS["fid"].better(2.0, 3.0) and not SET_METRICS["fid"].better(3.0, 2.0)
    assert SET_METRICS["precision"].better(0.9, 0.8) and not SET_METRICS["precision"].better(0.8, 0.8)
