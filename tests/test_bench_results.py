"""benchmarks/bench_latency.py: the RESULTS.md sections it renders, and the settings its recorded commands parse to."""

from __future__ import annotations

import json
import shlex

import pytest
from benchmarks import bench_latency
from benchmarks._common import RESULTS_DIR

from cahp.bench import BenchConfig, bench_models, head_count_sweep
from cahp.core.io import to_jsonable

from .tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_benchmark_render_on_a_tiny_result():
    """benchmarks/bench_latency.py renders what bench_models returns (RESULTS.md is generated from it)."""
    dense, meta = tiny_model("bert"), bench_latency.metadata()
    cfg = BenchConfig(shapes="1x32", threads=1, reps=2, warmup=1)
    res = bench_models(dense, bench_latency.pruned_variants(dense, seed=0), cfg)
    settings = {
        "threads": 1, "shapes": [[1, 32]], "kernel": "auto", "reps": 2, "min_reps": 1, "budget_s": 1.0,
        "warmup": 1, "seed": 0, "onnx": False, "clock": "wall", "quick": True,
    }  # fmt: skip
    text = bench_latency.render({"meta": meta, "settings": settings, "models": {"tiny": to_jsonable(res)}})
    assert "| tiny | 75% |" in text and "floor-rel" in text and "50% (empty layers)" in text
    assert "; ratios " in text and "(ratios: " in text
    assert "Allocator: " + res["allocator"] in text
    # the head-count sweep renders through the same entry point
    sweep = head_count_sweep(dense, 1, 8, BenchConfig(threads=1, reps=3, warmup=1), n_boot=100)
    text = bench_latency.render({"meta": meta, "settings": {**settings, "sweep": True}, "models": {"tiny": [sweep]}})
    assert "| tiny | 1x8 |" in text and "ceiling" in text and "| heads per layer | 4 | 3 | 2 | 1 | 0 (floor) |" in text
    # undefined figures (NaN, None once in JSON) render as a dash
    nan_fit = {k: None for k in sweep["fit"]}
    text = bench_latency.render({"meta": meta, "settings": {**settings, "sweep": True},
                                 "models": {"tiny": [{**sweep, "fit": nan_fit, "uniform_ceiling_ci95": [None, None]}]}})
    assert "| – | –% | – [–, –] |" in text or "| - | -% | - [-, -] |" in text


def test_benchmark_goal_overview_lists_every_run_of_each_cell():
    """RESULTS.md's overview of issue 6's goals: one row per pruned model, goal shape and run, oldest run first."""
    dense = tiny_model("bert")
    res = to_jsonable(bench_models(dense, bench_latency.pruned_variants(dense, seed=0, only=["50", "75"]),
                                   BenchConfig(shapes="1x32,1x8", threads=1, reps=3, warmup=1)))  # fmt: skip
    settings = {"threads": 1, "shapes": [[1, 32], [1, 8]]}
    meta = {"date": "2026-11-27T01:00:00", "git_revision": "bbb"}
    newer = {"meta": meta, "settings": settings, "models": {"tiny": res}}
    older = {**newer, "meta": {"date": "2026-11-26T01:00:00", "git_revision": "aaa"}}
    sweep = {"meta": newer["meta"], "settings": {"threads": 1, "sweep": True}, "models": {"tiny": []}}
    text = bench_latency.render_overview({"new": newer, "sweep": sweep, "old": older})
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    # 1x8 has no goal, the sweep has no pruned models: 2 variants x 1 shape x 2 runs
    assert [r.split(" | ")[1:4] for r in rows] == [["50%", "1x32", "`old`"], ["50%", "1x32", "`new`"],
                                                   ["75%", "1x32", "`old`"], ["75%", "1x32", "`new`"]]  # fmt: skip
    assert all(r.count("|") == 12 for r in rows) and "aaa" in rows[0] and "bbb" in rows[1]
    assert all(any(v in r for v in ("met", "missed", "undecided")) for r in rows)
    # a bound that would round onto the goal gets the digits that tell the verdict
    assert bench_latency._fmt_figure(0.97, [0.951, 1.0], 0.95) == "0.97 [0.951, 1.00]"
    assert bench_latency._fmt_figure(0.97, [0.9496, 1.0], 0.95) == "0.97 [0.9496, 1.00]"
    assert bench_latency._fmt_figure(0.97, [0.9496, 1.0]) == "0.97 [0.95, 1.00]"
    assert bench_latency._fmt_figure(0.97, None, 0.95) == "0.97"


def test_benchmark_onnx_verdict_uses_the_interval():
    """ONNX at least as fast: met / missed only when the ratio's 95% interval is on one side of 1."""
    assert bench_latency._ratio_verdict(0.9, [0.85, 0.95]) == "met"
    assert bench_latency._ratio_verdict(1.1, [1.02, 1.2]) == "missed"
    assert bench_latency._ratio_verdict(1.03, [0.99, 1.07]) == "undecided"
    assert bench_latency._ratio_verdict(1.03, None) == "missed"
    # a run written before the ratio was stored: from the medians, its interval from the kept times
    run = {
        "timings": {"half": {"median_ms": 10.0}, "onnx:half": {"median_ms": 12.0}},
        "times_ms": {"half": [10.0, 10.1, 9.9, 10.0], "onnx:half": [12.0, 12.2, 11.8, 12.1]},
    }
    ratio, ci = bench_latency._onnx_ratio(run, "half")
    assert ratio == pytest.approx(1.2) and 1.15 < ci[0] <= ci[1] < 1.25
    assert bench_latency._onnx_ratio({"timings": {"half": {"median_ms": 1.0}}}, "half") is None
    # undefined intervals (NaN, null once in JSON, e.g. from a single repetition) fall back to the point figure
    assert bench_latency._goal_verdict(0.9, [None, None], 0.85) == "met"
    assert bench_latency._goal_verdict(0.8, [float("nan"), float("nan")], 0.85) == "missed"
    assert bench_latency._ratio_verdict(0.9, [None, None]) == "met"
    run = {"timings": run["timings"], "onnx_ratio": {"half": 1.2}, "onnx_ratio_ci95": {"half": [None, None]}}
    assert bench_latency._onnx_ratio(run, "half") == (1.2, None)


def test_benchmark_ratio_figure_of_an_older_result():
    """Results written before the ratio-based figure was stored get it from their per-repetition times."""
    times = {"dense": [10.0, 20.0, 10.5, 15.0], "half": [7.0, 14.0, 7.35, 10.5], "no_attention": [4.0, 8.0, 4.2, 6.0]}
    x, ci = bench_latency._ratio_figure({"times_ms": times}, "half", 0.5)
    assert x == pytest.approx(1.0) and ci == pytest.approx([1.0, 1.0])
    stored = {"floor_relative_ratio": {"half": 0.9}, "floor_relative_ratio_ci95": {"half": [0.8, 1.0]}}
    assert bench_latency._ratio_figure(stored, "half", 0.5) == (0.9, [0.8, 1.0])
    assert bench_latency._ratio_figure({"times_ms": {"dense": [1.0]}}, "half", 0.5) is None


def test_latency_commands_reproduce_their_recorded_settings():
    """benchmarks/bench_latency.py takes `cahp bench`'s timing options: every committed latency result's
    command still parses to the settings that result records."""
    files = sorted(RESULTS_DIR.glob("latency*.json"))
    assert files
    for f in files:
        r = json.loads(f.read_text())
        argv = shlex.split(r["meta"]["command"])
        script = next(i for i, a in enumerate(argv) if a.endswith("bench_latency.py"))
        _, settings = bench_latency.settings_of(bench_latency.build_parser().parse_args(argv[script + 1:]))
        recorded = r["settings"]
        assert {k: settings[k] for k in recorded} == recorded, f.name
    # a smoke run replaces the timing settings it names
    cfg, settings = bench_latency.settings_of(bench_latency.build_parser().parse_args(["--quick", "--reps", "50"]))
    assert (cfg.reps, cfg.shapes, settings["quick"]) == (3, "1x8,2x16", True)
