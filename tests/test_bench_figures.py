"""The figures of a latency comparison on synthetic times: floor-relative savings, intervals, the block-cost fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cahp.bench.figures import (
    floor_relative,
    floor_relative_ci,
    paired_floor_relative,
    ratio_ci,
    ratio_floor_relative,
    summarize,
)
from cahp.bench.sweep import fit_block_cost


def test_floor_relative_synthetic():
    assert floor_relative(10.0, 7.0, 4.0, 0.5) == pytest.approx(1.0)  # on the line
    assert floor_relative(10.0, 8.0, 4.0, 0.5) == pytest.approx(2 / 3)  # 2 of the 3 ms saved
    assert floor_relative(10.0, 5.5, 4.0, 0.75) == pytest.approx(1.0)
    assert floor_relative(10.0, 10.5, 4.0, 0.5) < 0  # slower than dense
    assert math.isnan(floor_relative(10.0, 9.0, 4.0, 0.0))  # nothing removed
    assert math.isnan(floor_relative(10.0, 9.0, 10.0, 0.5))  # attention costs nothing measurable


def test_paired_floor_relative():
    dense, floor = [10.0, 20.0, 10.0], [4.0, 14.0, 4.0]
    assert paired_floor_relative(dense, [7.0, 17.0, 7.0], floor, 0.5) == pytest.approx(1.0)  # drift cancels
    assert math.isnan(paired_floor_relative([], [], [], 0.5))


def test_floor_relative_ci():
    rng = np.random.default_rng(1)
    n = 60
    # a pruned model exactly on the line, with independent noise on every call
    dense, floor = 10 + rng.normal(0, 0.3, n), 4 + rng.normal(0, 0.3, n)
    pruned = 7 + rng.normal(0, 0.3, n)
    lo, hi = floor_relative_ci(dense, pruned, floor, 0.5)
    assert lo < 1.0 < hi and hi - lo < 0.5
    point = floor_relative(np.median(dense), np.median(pruned), np.median(floor), 0.5)
    assert lo <= point <= hi
    # more noise: a wider interval; a pruned model no faster than dense: an interval far below the line
    lo2, hi2 = floor_relative_ci(10 + rng.normal(0, 1.5, n), pruned, floor, 0.5)
    assert hi2 - lo2 > hi - lo
    lo3, hi3 = floor_relative_ci(dense, dense + 0.01, floor, 0.5)
    assert hi3 < 0.2
    assert floor_relative_ci(dense, pruned, floor, 0.5, seed=3) == floor_relative_ci(dense, pruned, floor, 0.5, seed=3)
    assert all(math.isnan(x) for x in floor_relative_ci([1.0], [1.0], [1.0], 0.5))


def test_ratio_floor_relative_cancels_a_slowdown_shared_by_a_repetition():
    rng = np.random.default_rng(5)
    n = 80
    # every call of one repetition slowed by the same factor (0.8x-1.6x), plus 1% noise of its own
    speed = rng.uniform(0.8, 1.6, n)

    def calls(base):
        return base * speed * (1 + rng.normal(0, 0.01, n))

    dense, pruned, floor = calls(10.0), calls(7.3), calls(4.0)  # true figure: 2.7 / 3 = 0.9
    assert ratio_floor_relative(dense, pruned, floor, 0.5) == pytest.approx(0.9, abs=0.02)
    lo, hi = floor_relative_ci(dense, pruned, floor, 0.5, from_ratios=True)
    assert lo < 0.9 < hi and hi - lo < 0.05
    # the figure from medians sees the slowdown as noise: a much wider interval
    mlo, mhi = floor_relative_ci(dense, pruned, floor, 0.5)
    assert mhi - mlo > 4 * (hi - lo)
    # without noise the two estimates agree exactly
    exact = ratio_floor_relative([10.0, 20.0], [7.0, 14.0], [4.0, 8.0], 0.5)
    assert exact == pytest.approx(floor_relative(10.0, 7.0, 4.0, 0.5))
    assert math.isnan(ratio_floor_relative([], [], [], 0.5))
    # a call the clock read as 0 ms is left out, not divided by
    assert ratio_floor_relative([0.0, 10.0], [5.0, 7.0], [1.0, 4.0], 0.5) == pytest.approx(1.0)
    assert all(math.isnan(x) for x in floor_relative_ci([1.0], [1.0], [1.0], 0.5, from_ratios=True))


def test_ratio_ci():
    rng = np.random.default_rng(2)
    torch_ms = 10 + rng.normal(0, 0.5, 80)
    # a runtime 10% slower on every call, plus its own noise: the interval holds 1.1, not 1.0
    onnx_ms = 1.1 * torch_ms + rng.normal(0, 0.2, 80)
    lo, hi = ratio_ci(onnx_ms, torch_ms)
    assert 1.0 < lo < 1.1 < hi < 1.2
    # the same calls twice: exactly 1
    assert ratio_ci(torch_ms, torch_ms) == [1.0, 1.0]
    assert ratio_ci(onnx_ms, torch_ms, seed=4) == ratio_ci(onnx_ms, torch_ms, seed=4)
    assert all(math.isnan(x) for x in ratio_ci([1.0], [1.0]))
    assert all(math.isnan(x) for x in ratio_ci([1.0, 1.0], [0.0, 0.0]))


def test_summarize_median_iqr():
    s = summarize([0.001, 0.002, 0.003, 0.004, 0.005], batch=4, seq=8)
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["iqr_ms"] == pytest.approx(2.0)
    assert s["sequences_per_s"] == pytest.approx(4 / 0.003)
    assert s["n"] == 5


def test_fit_block_cost_recovers_a_line():
    # cost(h) = 0.1 + 0.05 h per block: the fixed part is 0.1 / (0.1 + 12 * 0.05) = 1/7 of a dense block
    counts = list(range(1, 13))
    fit = fit_block_cost(counts, [0.1 + 0.05 * h for h in counts], heads=12)
    assert fit["fixed_ms"] == pytest.approx(0.1) and fit["per_head_ms"] == pytest.approx(0.05)
    assert fit["fixed_share"] == pytest.approx(1 / 7) and fit["uniform_ceiling"] == pytest.approx(6 / 7)
    # proportional cost: on the line
    assert fit_block_cost([1, 4, 8], [0.2, 0.8, 1.6], heads=8)["uniform_ceiling"] == pytest.approx(1.0)
    # one count cannot fix a line
    assert math.isnan(fit_block_cost([3], [0.5], heads=8)["uniform_ceiling"])
