"""The metric math against closed forms and brute-force float64 references."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch

from admkit.metrics import fid as fid_module
from admkit.metrics.fid import (
    GaussianStatistics,
    RunningStatistics,
    frechet_distance,
    statistics_of,
)
from admkit.metrics.inception_score import class_probabilities, inception_score
from admkit.metrics.precision_recall import manifold_radii, precision_recall, squared_distances

# ---- Fréchet distance ----------------------------------------------------------------------


def test_fid_of_diagonal_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    got = frechet_distance(
        GaussianStatistics(mu1, np.diag(var1)), GaussianStatistics(mu2, np.diag(var2))
    )
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_of_full_covariances_matches_the_eigenvalue_form_and_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 30)), rng.normal(size=(200, 30)) @ rng.normal(size=(30, 30))
    s1, s2 = statistics_of(a), statistics_of(b)
    # tr (Σ₁Σ₂)^½ = Σ √λ(Σ₁Σ₂): the eigenvalues of a product of SPD matrices are real and ≥ 0.
    eigenvalues = np.linalg.eigvals(s1.sigma @ s2.sigma).real.clip(min=0)
    expected = (
        np.sum((s1.mu - s2.mu) ** 2)
        + np.trace(s1.sigma)
        + np.trace(s2.sigma)
        - 2 * np.sum(np.sqrt(eigenvalues))
    )
    assert frechet_distance(s1, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(s2, s1) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(s1, s1) == pytest.approx(0, abs=1e-8)


def test_fid_retries_with_eps_on_the_diagonals_when_the_root_is_not_finite(monkeypatch):
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def fake_sqrtm(matrix):
        calls.append(matrix.copy())
        if len(calls) == 1:
            return np.full_like(matrix, np.inf)
        return real_sqrtm(matrix)

    monkeypatch.setattr(fid_module.scipy.linalg, "sqrtm", fake_sqrtm)
    sigma1, sigma2 = np.diag([1.0, 4.0]), np.diag([9.0, 16.0])
    stats1, stats2 = GaussianStatistics(np.zeros(2), sigma1), GaussianStatistics(np.ones(2), sigma2)
    with pytest.warns(UserWarning, match="not finite"):
        got = frechet_distance(stats1, stats2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (sigma1 + 1e-6 * np.eye(2)) @ (sigma2 + 1e-6 * np.eye(2)))
    root = np.sqrt(np.diag(calls[1]))
    assert got == pytest.approx(2 + 1 + 4 + 9 + 16 - 2 * root.sum(), rel=1e-12)


def test_fid_rejects_a_root_with_a_large_imaginary_part_and_drops_a_small_one():
    # Σ₁Σ₂ with a negative eigenvalue -a has the root i·√a on its diagonal.
    identity = GaussianStatistics(np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(identity, GaussianStatistics(np.zeros(2), np.diag([-1.0, 1.0])))
    small = GaussianStatistics(np.zeros(2), np.diag([-1e-8, 1.0]))  # imaginary part 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = frechet_distance(identity, small)
    # tr Σ₁ = 2, tr Σ₂ = 1 − 1e-8, real part of tr (Σ₁Σ₂)^½ = 0 + 1.
    assert got == pytest.approx(2 + (1 - 1e-8) - 2 * 1.0, abs=1e-9)


def test_statistics_are_float64_mean_and_unbiased_covariance():
    features = np.random.default_rng(2).normal(5, 2, size=(50, 7)).astype(np.float32)
    stats = statistics_of(features)
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / 49, rtol=1e-12)


def test_running_statistics_match_np_cov_over_uneven_batches_and_merges():
    rng = np.random.default_rng(3)
    features = (rng.normal(size=(203, 11)) * rng.uniform(0.01, 5, 11) + 1000).astype(np.float32)
    first, second = RunningStatistics(11), RunningStatistics(11)
    for start, stop in [(0, 1), (1, 64), (64, 100), (100, 100)]:
        first.update(features[start:stop])
    second.update(features[100:203])
    first.merge(second)
    running = first.statistics()
    assert first.count == 203
    np.testing.assert_allclose(running.mu, features.astype(np.float64).mean(0), rtol=1e-13)
    expected = np.cov(features.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(running.sigma, expected, rtol=1e-9, atol=1e-12)


# ---- Inception Score -----------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    probs = np.full((40, 1008), 1 / 1008, dtype=np.float32)
    assert inception_score(probs) == pytest.approx(1.0, abs=1e-5)


def test_inception_score_of_confident_balanced_predictions_is_the_number_of_classes():
    k, n = 10, 200
    probs = np.full((n, k), 1e-6, dtype=np.float32)
    probs[np.arange(n), np.arange(n) % k] = 1 - (k - 1) * 1e-6
    assert inception_score(probs) == pytest.approx(k, rel=1e-3)


def test_inception_score_splits_are_consecutive_unshuffled_and_keep_the_remainder():
    k = 4
    confident = np.full((k, k), 1e-7, dtype=np.float32) + np.eye(k, dtype=np.float32)
    confident /= confident.sum(1, keepdims=True)
    # Split 1 (5 samples): all class 0, IS 1. Split 2: classes 0, 1, 2, 3, 0.
    # Split 3 (the remainder of 2): classes 2, 3, IS 2. Any shuffling would mix them.
    classes = [0, 0, 0, 0, 0, 0, 1, 2, 3, 0, 2, 3]
    probs = confident[classes]

    def single(p):
        marginal = p.astype(np.float64).mean(0)
        return np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), 1)))

    expected = np.mean([single(probs[0:5]), single(probs[5:10]), single(probs[10:12])])
    assert inception_score(probs, split_size=5) == pytest.approx(expected, rel=1e-5)
    assert single(probs[0:5]) == pytest.approx(1, abs=1e-4)
    assert single(probs[10:12]) == pytest.approx(2, rel=1e-4)
    assert inception_score(probs, split_size=12) != pytest.approx(expected, rel=1e-2)


def test_inception_score_uses_no_epsilon():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    with np.errstate(all="ignore"):
        assert np.isnan(inception_score(probs))


def test_class_probabilities_are_the_softmax_of_unbiased_logits_in_batches():
    rng = np.random.default_rng(4)
    pool_3 = rng.normal(size=(1030, 16)).astype(np.float32)
    weight = rng.normal(size=(9, 16)).astype(np.float32)
    got = class_probabilities(pool_3, torch.from_numpy(weight))
    expected = scipy.special.softmax(pool_3.astype(np.float64) @ weight.T.astype(np.float64), 1)
    assert got.shape == (1030, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


# ---- precision and recall ------------------------------------------------------------------


def brute_force_precision_recall(reference, sample, k=3):
    """float64, whole matrices: the definition with nothing clever."""
    reference, sample = reference.astype(np.float64), sample.astype(np.float64)

    def distances(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    radius_ref = np.sort(distances(reference, reference), axis=1)[:, k]
    radius_sample = np.sort(distances(sample, sample), axis=1)[:, k]
    cross = distances(reference, sample)
    precision = (cross <= radius_ref[:, None]).any(axis=0).mean()
    recall = (cross <= radius_sample[None, :]).any(axis=1).mean()
    return precision, recall


def integer_features(seed, n, d=8, low=0, high=6, offset=0):
    # Small integers: squared distances are exact in float16 and float32, so the float64
    # reference and the evaluator's mixed-precision rule must agree exactly, ties included.
    rng = np.random.default_rng(seed)
    return (rng.integers(low, high, size=(n, d)) + offset).astype(np.float32)


@pytest.mark.parametrize("batch_size", [10_000, 16, 7])
def test_precision_recall_match_brute_force(batch_size):
    reference = integer_features(5, 37)
    sample = integer_features(6, 53, high=8)
    expected = brute_force_precision_recall(reference, sample)
    got = precision_recall(reference, sample, batch_size=batch_size)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the sets are neither equal nor apart


def test_float16_overflow_falls_back_to_float32():
    # ‖x‖² ≈ 8 · 250² > 65504: the float16 norms overflow to inf and the block is redone in fp32.
    reference = integer_features(7, 30, offset=250)
    sample = integer_features(8, 41, high=9, offset=250)
    half = torch.from_numpy(reference[:3]).half()
    assert not torch.isfinite((half * half).sum(1)).all()
    distances = squared_distances(torch.from_numpy(reference), torch.from_numpy(sample))
    exact = ((reference[:, None].astype(np.float64) - sample[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(distances.numpy(), exact)
    expected = brute_force_precision_recall(reference, sample)
    assert precision_recall(reference, sample, batch_size=8) == pytest.approx(expected, abs=1e-12)


def test_distances_are_computed_in_float16_first():
    rng = np.random.default_rng(9)
    u = torch.from_numpy(rng.normal(size=(20, 64)).astype(np.float32))
    v = torch.from_numpy(rng.normal(size=(30, 64)).astype(np.float32))
    got = squared_distances(u, v)
    assert got.dtype == torch.float32
    assert torch.equal(got, got.half().float())  # every value is a float16 number
    exact = ((u[:, None].double() - v[None].double()) ** 2).sum(-1)
    assert (got.double() - exact).abs().max() > 1e-3  # and carries float16's rounding
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=0.5)


def test_radii_are_the_third_neighbour_not_counting_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=np.float32)
    radii = manifold_radii(torch.from_numpy(points))
    # 0: neighbours 1, 3, 6 -> 36; 1: 0, 3, 6 -> 25; 3: 1, 6, 0 -> 9; 6: 3, 10, 1 -> 25;
    # 10: 6, 3, 1 -> 81.
    assert radii.tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]


def test_identical_sets_are_perfect_and_distant_sets_score_zero():
    features = integer_features(10, 25)
    assert precision_recall(features, features) == (1.0, 1.0)
    assert precision_recall(features, features + 100) == (0.0, 0.0)


def test_precision_is_about_samples_and_recall_about_the_reference():
    # A tight sample cluster near one end of a spread-out reference: every sample lies in the
    # reference manifold (precision 1) but the samples cover little of the reference.
    reference = np.arange(20, dtype=np.float32)[:, None] * 4
    sample = np.array([[0.0], [1.0], [2.0], [1.0], [0.0], [2.0]], dtype=np.float32)
    precision, recall = precision_recall(reference, sample)
    assert (precision, recall) == pytest.approx(brute_force_precision_recall(reference, sample))
    assert precision == 1.0 and recall == pytest.approx(1 / 20)
