"""The figures of a latency comparison: floor-relative savings, bootstrap intervals, per-model summaries.

Every series of per-call times is aligned by round-robin repetition (see
`cahp.bench.timing.time_round_robin`): index ``i`` of each list comes from the
same repetition, which the paired and ratio-based figures and the bootstrap
resampling rely on.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np


def floor_relative(dense: float, pruned: float, no_attention: float, share_removed: float) -> float:
    """Share of the ideal saving realised: ``(dense - pruned) / ((dense - no_attention) * share_removed)``.

    1.0 means the pruned model sits on the line from dense (nothing removed) to
    the attention-free floor (everything removed); NaN when undefined (no head
    removed, or no measurable attention cost).
    """
    span = (dense - no_attention) * share_removed
    if not share_removed or span <= 0 or not all(map(math.isfinite, (dense, pruned, no_attention))):
        return float("nan")
    return (dense - pruned) / span


def paired_floor_relative(
    dense: Sequence[float], pruned: Sequence[float], no_attention: Sequence[float], share_removed: float
) -> float:
    """`floor_relative` from per-repetition differences: median(dense - pruned) / median(dense - floor) / share.

    The three lists are aligned by repetition (round-robin), so slow drifts of
    the machine cancel in each difference; a check on the figure from medians.
    """
    n = min(len(dense), len(pruned), len(no_attention))
    if n == 0:
        return float("nan")
    saved = statistics.median(d - p for d, p in zip(dense[:n], pruned[:n]))
    span = statistics.median(d - f for d, f in zip(dense[:n], no_attention[:n]))
    return floor_relative(span, span - saved, 0.0, share_removed)


def _ratio_series(
    dense: Sequence[float], pruned: Sequence[float], no_attention: Sequence[float]
) -> tuple[list[float], list[float]]:
    """Per-repetition ``pruned / dense`` and ``no_attention / dense``, still aligned by repetition.

    A repetition whose dense time is not positive (a coarse CPU clock can read 0) is left out of both.
    """
    kept = [(p / d, f / d) for d, p, f in zip(dense, pruned, no_attention) if d > 0]
    return [p for p, _ in kept], [f for _, f in kept]


def ratio_floor_relative(
    dense: Sequence[float], pruned: Sequence[float], no_attention: Sequence[float], share_removed: float
) -> float:
    """`floor_relative` from per-repetition ratios to the dense call: (1 - median(p/d)) / ((1 - median(f/d)) * share).

    On this kind of machine the noise is a slowdown of everything running for
    a while (process CPU time moves with wall time: not preemption), so it
    multiplies the calls of one repetition alike and cancels in their ratios.
    The same quantity as the figure from medians (the algebra is identical),
    estimated with less of the machine's drift in it.
    """
    rp, rf = _ratio_series(dense, pruned, no_attention)
    if not rp:
        return float("nan")
    return floor_relative(1.0, statistics.median(rp), statistics.median(rf), share_removed)


def bootstrap_medians_ci(series: Sequence[Sequence[float]], statistic, n_boot: int = 2000, seed: int = 0):
    """95% percentile interval of ``statistic(*medians)`` over bootstrap resamples of aligned repetitions.

    Every list of ``series`` is cut to the shortest and resampled with the same
    indices (they are aligned by round-robin repetition); ``statistic`` gets one
    array of ``n_boot`` resampled medians per list and returns ``n_boot`` values.
    Non-finite values are dropped; fewer than 2 repetitions, or a statistic
    undefined in most resamples, give ``[nan, nan]``.
    """
    n = min(len(x) for x in series)
    if n < 2:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    medians = [np.median(np.asarray(x[:n], dtype=np.float64)[idx], axis=1) for x in series]
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(statistic(*medians), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < n_boot // 2:  # undefined in most resamples: no usable interval
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def floor_relative_ci(
    dense: Sequence[float],
    pruned: Sequence[float],
    no_attention: Sequence[float],
    share_removed: float,
    n_boot: int = 2000,
    seed: int = 0,
    from_ratios: bool = False,
) -> list[float]:
    """95% bootstrap interval of the median-based `floor_relative` figure (``from_ratios``: of `ratio_floor_relative`).

    Repetitions are resampled with replacement, the same indices for the three
    lists (they are aligned by round-robin repetition), and the figure is
    recomputed from the resampled medians. On a noisy machine the interval says
    whether a goal is met, missed, or cannot be told from these runs.
    """
    if from_ratios:
        series = _ratio_series(dense, pruned, no_attention)

        def figure(mp, mf):
            return [floor_relative(1.0, a, b, share_removed) for a, b in zip(mp, mf)]

    else:
        series = (dense, pruned, no_attention)

        def figure(md, mp, mf):
            return [floor_relative(a, b, c, share_removed) for a, b, c in zip(md, mp, mf)]

    return bootstrap_medians_ci(series, figure, n_boot, seed)


def ratio_ci(
    numer: Sequence[float], denom: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> list[float]:
    """95% bootstrap interval of ``median(numer) / median(denom)``, repetitions resampled jointly.

    The two lists are aligned by round-robin repetition (the same indices are
    drawn for both). Used for the ONNX / PyTorch latency ratio of one model.
    """
    return bootstrap_medians_ci((numer, denom), lambda a, b: a / b, n_boot, seed)


def summarize(times_s: Sequence[float], batch: int, seq: int) -> dict:
    """Median, quartiles and IQR in ms; throughput from the median."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    med = statistics.median(ms)
    return {
        "median_ms": med,
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": ms[0],
        "n": len(ms),
        "sequences_per_s": batch / (med / 1e3),
        "tokens_per_s": batch * seq / (med / 1e3),
    }
