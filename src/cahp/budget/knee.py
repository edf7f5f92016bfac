"""CAHP step 6, knee: the knee of the diminishing-marginal-performance curve.

Input: ``ks`` (number of kept heads, any order, e.g. 72, 68, ..., 4) and ``scores`` (task score at
each k, higher is better, e.g. accuracy on held-out training data). A polynomial is fitted to score
against k and the knee k* is read off the fitted curve: the point where, going from many heads to
few, removing more heads starts to cost sharply.

Rules (all documented in :func:`find_knee`):

* Degree: given, or chosen automatically as the smallest degree in 2..5 whose adjusted R^2 is
  within 0.01 of the best adjusted R^2 among those degrees, never above ``n - 2`` for ``n`` distinct
  ks (so that adjusted R^2 is defined and the fit keeps at least one residual degree of freedom).
* Knee, ``method="chord"`` (default, the Kneedle idea): on the fitted curve in normalised
  coordinates (k and fitted score each min-max scaled to [0, 1] over the integer grid), the k of
  maximum perpendicular distance *above* the chord joining the curve's endpoints (the concave bend
  of a plateau followed by a drop).
* Knee, ``method="curvature"``: the k of maximum curvature ``|f''| / (1 + f'^2)^1.5`` of the
  normalised fitted polynomial, among concave grid points (``f'' < 0``) up to the fitted maximum.
  Caveat: a low-degree polynomial smooths a sharp bend over many heads, and the curvature maximum
  of such a smoothed bend lies on its flat side, so this method tends to pick *more* heads than
  the true bend (about +10 on a plateau-then-linear-drop curve at k=30 on a 4..72 grid, where
  "chord" lands within ~3). That is conservative (keeps more heads); "chord" is the default.
* Fallbacks, never a crash: the tolerance rule "smallest observed k whose score is within ``tol``
  of the best observed score" is used when there are fewer than 4 distinct ks (``"too_few_points"``),
  when the fitted curve is flat (``"flat"``, range < ``tol``), or when it has no knee
  (``"no_knee"``: max chord distance < 0.02 normalised units, e.g. a straight line, a convex curve or
  a curve that does not rise with k).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["KNEE_METHODS", "KneeResult", "find_knee", "fit_polynomial"]

KNEE_METHODS: tuple[str, ...] = ("chord", "curvature")
_AUTO_DEGREES = (2, 3, 4, 5)
_ADJ_R2_SLACK = 0.01
_MIN_POINTS = 4
_NO_KNEE_DISTANCE = 0.02


@dataclass
class KneeResult:
    """Result of :func:`find_knee`.

    Attributes:
        k: chosen number of heads k* (integer in ``[min(ks), max(ks)]``, ``>= min_keep``).
        method: knee method used (``"chord"`` or ``"curvature"``), even when a fallback decided k.
        degree: polynomial degree of the fit.
        coefficients: polynomial coefficients in **raw k**, highest power first
            (``np.polyval(coefficients, k)`` = fitted score).
        fitted: fitted score at every k of ``grid``.
        grid: dense integer grid ``min(ks)..max(ks)``.
        fallback: ``None`` when the knee of the fitted curve was used, else ``"too_few_points"``,
            ``"flat"`` or ``"no_knee"`` (the tolerance rule decided k).
        warning: human-readable notes (ignored NaN points, fallback reason, clamping), ``"; "``-joined.
        r2: coefficient of determination of the fit on the points used.
    """

    k: int
    method: str
    degree: int
    coefficients: list[float]
    fitted: list[float]
    grid: list[int]
    fallback: str | None
    warning: str | None
    r2: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain Python ints, floats, strings, lists, None)."""
        return dataclasses.asdict(self)


def _as_arrays(ks: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(ks, dtype=np.float64).ravel()
    y = np.asarray(scores, dtype=np.float64).ravel()
    if k.shape != y.shape:
        raise ValueError(f"ks and scores must have the same length, got {k.size} and {y.size}")
    if k.size == 0:
        raise ValueError("ks is empty")
    if not np.all(np.isfinite(k)):
        raise ValueError("ks contains NaN or infinite values")
    if np.any(k != np.round(k)) or np.any(k < 1):
        raise ValueError(f"ks must be positive integers, got {np.asarray(ks).tolist()}")
    return k, y


def _normaliser(k: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.min(k)), float(np.max(k))
    return lo, (hi - lo) if hi > lo else 1.0


def _fit_normalised(k: np.ndarray, y: np.ndarray, degree: int) -> tuple[np.poly1d, float, float]:
    lo, span = _normaliser(k)
    coef = np.polyfit((k - lo) / span, y, degree)
    return np.poly1d(coef), lo, span


def fit_polynomial(ks: Any, scores: Any, degree: int) -> np.poly1d:
    """Least-squares polynomial fit of score against k.

    The fit is done on ``x = (k - min(ks)) / (max(ks) - min(ks))`` in ``[0, 1]`` (good conditioning
    for any k range); the returned :class:`numpy.poly1d` is that polynomial composed with the
    normalisation, so it **takes raw k** (``p(40)`` is the fitted score at 40 heads).

    Args:
        ks: ``(n,)`` numbers of kept heads (any order; repeats allowed).
        scores: ``(n,)`` finite scores.
        degree: polynomial degree, ``0 <= degree < number of distinct ks``.
    """
    k, y = _as_arrays(ks, scores)
    if not np.all(np.isfinite(y)):
        raise ValueError("scores contain NaN or infinite values")
    distinct = np.unique(k).size
    if isinstance(degree, bool) or int(degree) != degree or not 0 <= degree < distinct:
        raise ValueError(f"degree must be an integer in 0..{distinct - 1} for {distinct} distinct ks, got {degree}")
    p, lo, span = _fit_normalised(k, y, int(degree))
    return p(np.poly1d([1.0 / span, -lo / span]))


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    ss_res = float(np.sum((y - yhat) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    if ss_tot <= 1e-300:
        return 1.0 if ss_res <= 1e-24 else 0.0
    return 1.0 - ss_res / ss_tot


def _adjusted_r2(r2: float, n: int, degree: int) -> float:
    return 1.0 - (1.0 - r2) * (n - 1) / (n - degree - 1)


def _auto_degree(k: np.ndarray, y: np.ndarray, max_degree: int) -> int:
    n = k.size
    degrees = [d for d in _AUTO_DEGREES if d <= max_degree and n - d - 1 > 0]
    if not degrees:
        return max(0, min(max_degree, 1))
    adj = {}
    for d in degrees:
        p, lo, span = _fit_normalised(k, y, d)
        adj[d] = _adjusted_r2(_r2(y, p((k - lo) / span)), n, d)
    best = max(adj.values())
    return min(d for d in degrees if adj[d] >= best - _ADJ_R2_SLACK)


def _tolerance_k(k: np.ndarray, y: np.ndarray, tol: float) -> int:
    """Smallest observed k whose observed score is within ``tol`` of the best observed score."""
    return int(np.min(k[y >= np.max(y) - tol]))


def find_knee(
    ks: Any,
    scores: Any,
    degree: int | None = None,
    method: str = "chord",
    min_keep: int = 1,
    tol: float = 0.01,
    higher_is_better: bool = True,
) -> KneeResult:
    """Knee of the score-vs-kept-heads curve: the number of heads k* to keep.

    Args:
        ks: ``(n,)`` numbers of kept heads, any order (repeats allowed, e.g. several seeds).
        scores: ``(n,)`` task scores at each k. NaN/inf points are ignored with a warning; all
            non-finite raises ValueError.
        degree: polynomial degree; ``None`` = automatic: the smallest degree in 2..5 whose adjusted
            R^2 is within 0.01 of the best, never more than ``n_distinct - 2``. An explicit degree
            above ``n_distinct - 2`` is lowered to it (with a warning).
        method: ``"chord"`` (default; maximum distance above the endpoint chord, in normalised
            coordinates) or ``"curvature"`` (maximum curvature of the normalised fit, concave part
            up to the fitted maximum; biased towards more heads, see the module docstring).
        min_keep: the returned k is at least this (raised with a warning if needed).
        tol: absolute score tolerance of the fallbacks (default 0.01, e.g. one accuracy point).
        higher_is_better: set False for losses; the curve is then mirrored internally (reported
            ``fitted``/``coefficients`` stay in the original units).

    Returns:
        :class:`KneeResult`. ``k`` is an int in ``[min(ks), max(ks)]`` (over the finite points) and
        ``>= min_keep``.

    Fallbacks (``k`` from the tolerance rule = smallest observed k whose score is ``>= best - tol``):

    * ``"too_few_points"``: fewer than 4 distinct ks (a low-degree fit is still reported).
    * ``"flat"``: the fitted curve's range over the grid is below ``tol``: removing heads costs no
      score on this range; the warning says so.
    * ``"no_knee"``: the fitted curve stays within 0.02 (normalised units) of its chord, or only
      bends the convex way, or the curvature method finds no concave point: no sharp drop to locate.
    """
    if method not in KNEE_METHODS:
        raise ValueError(f"unknown knee method {method!r}; valid methods are {', '.join(KNEE_METHODS)}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(min_keep, bool) or int(min_keep) != min_keep or min_keep < 1:
        raise ValueError(f"min_keep must be a positive integer, got {min_keep!r}")
    k_all, y_all = _as_arrays(ks, scores)
    notes: list[str] = []
    finite = np.isfinite(y_all)
    if not finite.any():
        raise ValueError("all scores are NaN or infinite")
    if not finite.all():
        bad = sorted(int(v) for v in k_all[~finite])
        notes.append(f"ignored {int((~finite).sum())} point(s) with non-finite scores at k={bad}")
    k, y_obs = k_all[finite], y_all[finite]
    sign = 1.0 if higher_is_better else -1.0
    y = sign * y_obs  # internally, higher is better
    k_lo, k_hi = int(np.min(k)), int(np.max(k))
    if min_keep > k_hi:
        raise ValueError(f"min_keep={min_keep} exceeds the largest k evaluated ({k_hi})")
    grid = np.arange(k_lo, k_hi + 1)
    n_distinct = np.unique(k).size

    # ---- fit
    max_degree = max(0, n_distinct - 2)
    if n_distinct < _MIN_POINTS:
        deg = min(2, max_degree)
    elif degree is None:
        deg = _auto_degree(k, y, max_degree)
    else:
        if isinstance(degree, bool) or int(degree) != degree or degree < 1:
            raise ValueError(f"degree must be a positive integer or None, got {degree!r}")
        deg = int(degree)
        if deg > max_degree:
            notes.append(f"degree {deg} lowered to {max_degree} (at most n_distinct - 2 = {max_degree})")
            deg = max_degree
    p, lo, span = _fit_normalised(k, y, deg)
    r2 = _r2(y, p((k - lo) / span))
    x = (grid - lo) / span
    f = p(x)
    raw = p(np.poly1d([1.0 / span, -lo / span]))

    fallback: str | None = None
    knee: int | None = None
    f_range = float(np.max(f) - np.min(f))
    if n_distinct < _MIN_POINTS:
        fallback = "too_few_points"
        notes.append(f"only {n_distinct} distinct k (< {_MIN_POINTS}): smallest k within tol={tol} of the best")
    elif f_range < tol:
        fallback = "flat"
        notes.append(
            f"flat curve (fitted range {f_range:.4g} < tol={tol}): removing heads costs no score on "
            f"k={k_lo}..{k_hi}; smallest k within tol of the best"
        )
    else:
        yn = (f - np.min(f)) / f_range
        # Perpendicular signed distance above the chord from (0, yn[0]) to (1, yn[-1]).
        dy = yn[-1] - yn[0]
        above = (yn - (yn[0] + dy * x)) / math.sqrt(1.0 + dy * dy)
        if dy <= 0:
            fallback = "no_knee"
            notes.append("fitted score does not rise with k: no knee; smallest k within tol of the best")
        elif float(np.max(above)) < _NO_KNEE_DISTANCE:
            fallback = "no_knee"
            notes.append(
                f"no knee (max distance above the chord {float(np.max(above)):.3g} < {_NO_KNEE_DISTANCE}): "
                "smallest k within tol of the best"
            )
        elif method == "chord":
            knee = int(grid[int(np.argmax(above))])
        else:
            d1 = p.deriv(1)(x) / f_range
            d2 = p.deriv(2)(x) / f_range if deg >= 2 else np.zeros_like(x)
            curvature = np.abs(d2) / (1.0 + d1**2) ** 1.5
            # Only concave points up to the fitted maximum: beyond it more heads do not help, and
            # polynomial end wiggles there must not be mistaken for the knee.
            candidates = (d2 < 0) & (grid <= grid[int(np.argmax(f))])
            if not candidates.any():
                fallback = "no_knee"
                notes.append("fitted curve has no concave bend: no knee; smallest k within tol of the best")
            else:
                knee = int(grid[int(np.argmax(np.where(candidates, curvature, -np.inf)))])
    if fallback is not None:
        knee = _tolerance_k(k, y, tol)
    assert knee is not None
    if knee < min_keep:
        notes.append(f"k={knee} raised to min_keep={min_keep}")
        knee = int(min_keep)
    knee = int(min(max(knee, k_lo), k_hi))

    return KneeResult(
        k=knee,
        method=method,
        degree=int(deg),
        coefficients=[float(c) for c in sign * np.atleast_1d(raw.coeffs)],
        fitted=[float(v) for v in sign * f],
        grid=[int(g) for g in grid],
        fallback=fallback,
        warning="; ".join(notes) if notes else None,
        r2=float(r2),
    )
