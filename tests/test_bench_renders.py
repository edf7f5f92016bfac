"""Sections of bench_within_layer.py (three within-layer rules on hand-made layers) and bench_prune.py --ffn."""

from __future__ import annotations

import numpy as np
from benchmarks import bench_within_layer as bw


def _layer():
    """Units 0-2: near-duplicates, salient; 3: a distinct, salient unit; 4: a far outlier of little salience."""
    pts = np.array([0.0, 0.01, 0.02, 1.0, 10.0])
    D = np.abs(pts[:, None] - pts[None, :])
    s = np.array([5.0, 4.9, 4.8, 3.0, 0.1])
    return D, s


def test_rules_differ_where_a_layer_keeps_few_units_and_agree_on_full_and_empty_layers():
    D, s = _layer()
    res = bw.compare_rules([(D, s), (D, s), (D, s)], [2, 5, 0])
    # the partly kept layer only: clusters at k=2 split off the outlier and keep it; greedy skips the duplicates of
    # unit 0 and takes unit 3; top keeps the two most salient (duplicates)
    (row,) = res["layers"]
    assert row["layer"] == 0 and row["kept"] == 2
    assert row["rules"]["top"]["salience_share"] == (5.0 + 4.9) / s.sum()
    assert row["rules"]["greedy"]["salience_share"] == (5.0 + 3.0) / s.sum()
    assert row["rules"]["clusters"]["salience_share"] == (5.0 + 0.1) / s.sum()
    assert row["rules"]["greedy"]["overlap_with_top"] == 0.5 and row["rules"]["top"]["median_rank"] == 1.5
    assert row["rules"]["clusters"]["median_rank"] == 3.0  # ranks 1 and 5
    # totals: the full layer counts for every rule, the empty one for none
    total = 3 * s.sum()
    assert np.isclose(res["salience_share"]["greedy"], (8.0 + s.sum()) / total)
    assert res["kept"] == 7


def test_render_states_the_ranges_it_measured():
    D, s = _layer()
    row = {"target": "3x", "method": "cahp",
           "heads": bw.compare_rules([(D, s)], [2]), "neurons": bw.compare_rules([(D, s)], [3])}
    meta = {"command": "python x", "date": "d", "git_revision": "r", "machine": {
        "cpu": "c", "cores": 2, "torch_threads": 1, "torch": "t", "gpu": None}}
    text = bw.render({"meta": meta, "model": "m", "task": "t", "counts_from": "f", "calibration_examples": 8,
                      "distance": "js", "rows": [row]})
    assert "| 3x | cahp | heads | 2 | 0.287 | 0.449 | 0.556 | 0.50 | 0.50 | 3.00 | 2.50 | 1.50 |" in text
    assert "Heads: the kept units hold 0.81-0.81" in text and "(range over the 1 allocations with a partly" in text


def test_bench_prune_renders_an_ffn_run_and_judges_the_cost_goal_only_when_nothing_was_cached():
    from benchmarks import bench_prune

    meta = {"command": "python x", "date": "d", "git_revision": "r", "machine": {
        "cpu": "c", "cores": 2, "torch_threads": 1, "torch": "t", "gpu": None}}
    acc = {"test": {"accuracy": 0.5, "accuracy_ci95": [0.48, 0.52]}}
    result = {"meta": meta, "ffn": True, "data": {"test_split": "test"}, "target_speedup": None, "k_source": "knee",
              "heads_kept": 40, "heads_before": 72, "neurons_kept": 3000, "neurons_before": 9216, "head_weight": 1.0,
              "heads_per_layer": [7] * 6, "neurons_per_layer": [500] * 6, "estimated_share": 0.5,
              "parameters": {"before": 22_000_000, "after": 15_000_000},
              "estimated_speedup": {"1x32": 1.9, "32x128": 2.1},
              "measured_speedup": {"1x32": {"speedup": 2.05, "ci95": [2.0, 2.1]}},
              "scores": {"before_pruning": acc, "after_pruning": acc, "after_finetune": None},
              "stage_seconds": {"curve": {"seconds": 250.0, "cached": False}}, "total_seconds": 1700.0}
    text = bench_prune.render(result)
    assert "| 1x32 | 1.90x | 2.05x | [2.00, 2.10] |" in text and "| 32x128 | 2.10x | - | - |" in text
    assert "the knee of the curve (knee)" in text and "pruned, fine-tuned once" not in text
    assert "(goal at most 30 minutes on this 2-core CPU: met)" in text
    result["stage_seconds"]["dense"] = {"seconds": 0.0, "cached": True}
    assert "not a measure of the full cost" in bench_prune.render({**result, "target_speedup": 2.0})
