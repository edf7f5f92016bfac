"""Tests for cahp.budget.knee: polynomial fit of score vs kept heads and the knee k*."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cahp.budget.knee import KNEE_METHODS, KneeResult, find_knee, fit_polynomial

KS = np.arange(72, 3, -4)  # 72, 68, ..., 4 (18 points)


def plateau_then_drop(ks: np.ndarray, knee: int = 30, noise: float = 0.005, seed: int = 0) -> np.ndarray:
    """0.8 for k >= knee, linear drop to 0.2 at k = 4, plus Gaussian noise."""
    clean = np.where(ks >= knee, 0.8, 0.2 + 0.6 * (ks - 4) / (knee - 4))
    return clean + np.random.default_rng(seed).normal(scale=noise, size=ks.size)


def check_result(r: KneeResult, ks: np.ndarray, min_keep: int = 1) -> None:
    assert isinstance(r.k, int)
    assert int(np.min(ks)) <= r.k <= int(np.max(ks))
    assert r.k >= min_keep
    assert r.grid == list(range(int(np.min(ks)), int(np.max(ks)) + 1))
    assert len(r.fitted) == len(r.grid)
    assert all(np.isfinite(r.fitted)) and np.isfinite(r.r2)
    json.dumps(r.to_dict())  # JSON-ready


@pytest.mark.parametrize("seed", range(5))
def test_chord_knee_near_true_knee(seed: int) -> None:
    y = plateau_then_drop(KS, seed=seed)
    r = find_knee(KS, y)
    check_result(r, KS)
    assert r.method == "chord" and r.fallback is None and r.warning is None
    assert abs(r.k - 30) <= 4
    assert r.r2 > 0.95


@pytest.mark.parametrize("seed", range(5))
def test_curvature_knee_near_true_knee(seed: int) -> None:
    y = plateau_then_drop(KS, seed=seed)
    r = find_knee(KS, y, method="curvature")
    check_result(r, KS)
    assert r.fallback is None
    # Max curvature of the smoothed polynomial bend sits on its flat side: conservative, never below
    # the true knee here, and within about a dozen heads of it (see the module docstring).
    assert 28 <= r.k <= 44


@pytest.mark.parametrize("knee", [20, 44])
def test_chord_tracks_other_knees(knee: int) -> None:
    r = find_knee(KS, plateau_then_drop(KS, knee=knee, seed=1))
    assert abs(r.k - knee) <= 6


def test_order_and_loss_orientation_do_not_matter() -> None:
    y = plateau_then_drop(KS, seed=2)
    perm = np.random.default_rng(0).permutation(KS.size)
    base = find_knee(KS, y)
    assert find_knee(KS[perm], y[perm]).k == base.k
    loss = find_knee(KS, 1.0 - y, higher_is_better=False)
    assert loss.k == base.k
    np.testing.assert_allclose(loss.fitted, 1.0 - np.asarray(base.fitted), atol=1e-9)


def test_flat_curve_falls_back() -> None:
    y = 0.8 + np.random.default_rng(0).normal(scale=0.002, size=KS.size)
    r = find_knee(KS, y)
    check_result(r, KS)
    assert r.fallback == "flat"
    assert r.warning and "flat" in r.warning
    assert r.k == int(np.min(KS[y >= y.max() - 0.01]))


def test_straight_line_has_no_knee() -> None:
    y = 0.2 + 0.6 * (KS - 4) / 68
    for method in KNEE_METHODS:
        r = find_knee(KS, y, method=method)
        check_result(r, KS)
        assert r.fallback == "no_knee" and r.warning
        assert r.k == 72  # only the full model is within tol of the best


def test_convex_and_decreasing_curves_have_no_knee() -> None:
    convex = 0.2 + 0.6 * ((KS - 4) / 68) ** 3
    assert find_knee(KS, convex).fallback == "no_knee"
    decreasing = 0.8 - 0.3 * (KS - 4) / 68
    r = find_knee(KS, decreasing)
    assert r.fallback == "no_knee" and r.k == 4


def test_too_few_points() -> None:
    for ks, ys, expected in [
        ([72], [0.8], 72),
        ([72, 36], [0.8, 0.795], 36),
        ([72, 36, 8], [0.8, 0.75, 0.3], 72),
    ]:
        r = find_knee(ks, ys)
        check_result(r, np.asarray(ks))
        assert r.fallback == "too_few_points" and r.k == expected and r.warning
        assert r.degree <= max(0, len(ks) - 2)
    # tol widens the tolerance rule
    assert find_knee([72, 36, 8], [0.8, 0.75, 0.3], tol=0.06).k == 36


def test_nan_scores_are_ignored_with_warning() -> None:
    y = plateau_then_drop(KS, seed=3)
    y_nan = y.copy()
    y_nan[[0, 5]] = np.nan
    r = find_knee(KS, y_nan)
    check_result(r, np.delete(KS, [0, 5]))  # grid and bounds follow the finite points
    assert r.warning and "non-finite" in r.warning and "72" in r.warning
    assert r.grid[-1] == 68  # k = 72 was dropped
    assert r.k == find_knee(np.delete(KS, [0, 5]), np.delete(y, [0, 5])).k
    with pytest.raises(ValueError, match="all scores"):
        find_knee(KS, np.full(KS.size, np.nan))


@pytest.mark.parametrize("n", [4, 5, 6, 7, 10])
def test_auto_degree_never_overfits(n: int) -> None:
    ks = np.linspace(4, 72, n).round().astype(int)
    for seed in range(3):
        r = find_knee(ks, plateau_then_drop(ks, seed=seed, noise=0.02))
        assert 1 <= r.degree <= min(5, n - 2)
        check_result(r, ks)


def test_explicit_degree_is_capped() -> None:
    ks = np.array([72, 50, 30, 10, 4])
    r = find_knee(ks, plateau_then_drop(ks), degree=6)
    assert r.degree == 3 and r.warning and "lowered" in r.warning


def test_min_keep() -> None:
    r = find_knee(KS, plateau_then_drop(KS), min_keep=40)
    check_result(r, KS, min_keep=40)
    assert r.k == 40 and "min_keep" in (r.warning or "")
    with pytest.raises(ValueError, match="min_keep"):
        find_knee(KS, plateau_then_drop(KS), min_keep=100)


def test_fit_polynomial_takes_raw_k() -> None:
    ks = np.array([4, 20, 36, 52, 68, 72])
    ys = 0.1 + 0.02 * ks - 1e-4 * ks**2
    p = fit_polynomial(ks, ys, 2)
    assert isinstance(p, np.poly1d)
    np.testing.assert_allclose(p(ks), ys, atol=1e-10)
    np.testing.assert_allclose(p.coeffs, [-1e-4, 0.02, 0.1], atol=1e-10)
    r = find_knee(KS, plateau_then_drop(KS))
    np.testing.assert_allclose(np.polyval(r.coefficients, r.grid), r.fitted, atol=1e-8)
    with pytest.raises(ValueError, match="degree"):
        fit_polynomial(ks, ys, 6)


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="same length"):
        find_knee([1, 2, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match="positive integers"):
        find_knee([1.5, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="valid methods"):
        find_knee(KS, plateau_then_drop(KS), method="elbow")
    with pytest.raises(ValueError, match="empty"):
        find_knee([], [])
