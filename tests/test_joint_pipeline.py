"""`cahp prune --ffn` end to end on a tiny random model and a tiny synthetic task, and its budget pieces."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import cahp
from cahp.budget.cost import BlockCost, CostTable, estimated_latency, mac_table
from cahp.budget.joint_curve import (
    JointBudgetError,
    aim_each,
    combined_table,
    fair_values,
    floor_share,
    knee_share,
    share_grid,
    worst_share,
)
from cahp.model.neurons import kept_neurons
from cahp.pipelines import joint as joint_pipeline
from cahp.pipelines.joint import JointConfig, JointSetupError, run_joint
from cahp.pipelines.prune import PruneConfig, run_prune
from cahp.selectors.joint import JointSelectionError, allocate
from cahp.stats.neurons import collect_neuron_stats
from cahp.train.finetune import FinetuneConfig
from tests.test_pipeline import tiny_setup  # noqa: F401  (the fixture: a tiny BERT and a synthetic task)
from tests.tiny import tiny_batch, tiny_model

FAST = JointConfig(cost_source="macs", cost_shapes="1x16,4x32", grid_points=6, min_share=0.3, speedup_budget=0.2)


def _cfgs(root, out, **kw):
    cfg = PruneConfig(model=str(root / "model"), task=str(root / "task"), output_dir=str(out), ffn=True,
                      calibration_examples=64, curve_examples=80, stats_batch_size=16, **kw)
    return cfg, FinetuneConfig(epochs=1, lr=2e-3, batch_size=16, seed=0)


def _outputs(model):
    torch.manual_seed(0)
    batch = tiny_batch(seq=12, vocab=model.config.vocab_size)
    with torch.no_grad():
        return model(**batch).logits


def test_joint_end_to_end_and_cached_rerun(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    cfg, ft = _cfgs(tiny_setup, tmp_path / "run")
    r = run_joint(cfg, ft, tmp_path / "run", progress=False, joint=FAST)
    out = tmp_path / "run"
    for name in ("report.json", "curve.png", "heads.png", "structure.png", "distances.png", "log.txt"):
        assert (out / name).is_file() or name == "log.txt", name
    rep = r.report
    for key in ("kept_heads", "heads_per_layer", "kept_neurons", "neurons_per_layer", "estimated_speedup",
                "measured_speedup", "share_star", "estimated_share", "scores", "parameters", "stage_seconds"):
        assert key in rep, key
    assert set(rep["estimated_speedup"]) == set(rep["measured_speedup"]) == {"1x16", "4x32"}
    for m in rep["measured_speedup"].values():
        assert m["speedup"] > 0 and m["ci95"][0] <= m["speedup"] <= m["ci95"][1]
    for part in ("before_pruning", "after_pruning", "after_finetune"):
        assert "ci95" in json.dumps(rep["scores"][part]) or rep["scores"][part]
    # the knee is one of the curve's points, and the report's selection is that point's allocation
    shares = [p["estimated_share"] for p in rep["curve"]]
    assert rep["share_star"] in shares and rep["curve"][0]["target_share"] == 1.0
    point = rep["curve"][shares.index(rep["share_star"])]
    assert rep["heads_per_layer"] == point["heads_per_layer"] and rep["neurons_per_layer"] == point["neurons_per_layer"]
    assert rep["parameters"]["after"] <= rep["parameters"]["before"]
    # the saved folder reloads identically and holds what the report says
    model, _ = cahp.load_pruned(out / "model")
    again, _ = cahp.load_pruned(out / "model")
    assert torch.equal(_outputs(model), _outputs(again))
    kept = kept_neurons(model.config)
    assert [len(kept[i]) for i in range(3)] == rep["neurons_per_layer"]
    assert cahp.num_kept(model) == rep["heads_kept"]
    # a re-run computes nothing
    for name in ("collect_neuron_stats", "finetune", "measure_speedup"):
        target = joint_pipeline.joint_report if name == "measure_speedup" else joint_pipeline
        monkeypatch.setattr(target, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    monkeypatch.setattr(joint_pipeline, "score_units", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    r2 = run_joint(cfg, ft, tmp_path / "run", progress=False, joint=FAST).report
    assert all(v["cached"] for v in r2["stage_seconds"].values()), r2["stage_seconds"]
    assert r2["kept_neurons"] == rep["kept_neurons"] and r2["kept_heads"] == rep["kept_heads"]


def test_target_speedup_and_dispatch(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(joint_pipeline, "JointConfig", lambda: FAST)  # run_prune's dispatch takes the defaults
    cfg, ft = _cfgs(tiny_setup, tmp_path / "run", target_speedup=2.5, skip_final_finetune=True)
    rep = run_prune(cfg, ft, progress=False).report
    assert rep["ffn"] and rep["k_source"] == "--target-speedup"
    assert rep["estimated_share"] <= 1 / 2.5 + 1e-9
    assert rep["scores"]["after_finetune"] is None
    cfg, ft = _cfgs(tiny_setup, tmp_path / "run2", target_speedup=1000.0, skip_final_finetune=True)
    with pytest.raises(JointSetupError, match="speedup of 1000.0 .at most"):
        run_prune(cfg, ft, progress=False)


def test_measured_cost_tables(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CAHP_CACHE_DIR", str(tmp_path / "cache"))
    cfg, ft = _cfgs(tiny_setup, tmp_path / "run", skip_final_finetune=True)
    rep = run_joint(cfg, ft, tmp_path / "run", progress=False,
                    joint=replace(FAST, cost_source="measured", speedup_budget=0)).report
    assert rep["cost_tables"]["1x16"]["source"] == "measured" and any((tmp_path / "cache" / "cost").iterdir())
    assert rep["measured_speedup"] is None and rep["estimated_share"] <= 1.0


def test_bad_joint_settings(tiny_setup, tmp_path):  # noqa: F811
    for kw, match in (({"target_speedup": 0.5}, "above 1"), ({"keep": 3}, "count heads only")):
        cfg, ft = _cfgs(tiny_setup, tmp_path / "r", **kw)
        with pytest.raises(JointSetupError, match=match):
            run_joint(cfg, ft, tmp_path / "r", progress=False, joint=FAST)
    cfg, ft = _cfgs(tiny_setup, tmp_path / "r")
    with pytest.raises(JointSetupError, match="positive numbers"):
        run_joint(cfg, ft, tmp_path / "r", progress=False, joint=JointConfig(head_weights="1,-2"))


def test_fair_values_keep_both_kinds_at_half_latency():
    """On an untrained model raw salience empties almost every attention block; per-kind scaling keeps both kinds."""
    model = tiny_model("bert")
    batches = []
    for seed in range(4):
        b = tiny_batch(seed=seed, seq=12)
        b["labels"] = torch.tensor([0, 1, 2, 0])
        batches.append(b)
    stats = collect_neuron_stats(model, batches, signatures=False, progress=False)
    table = mac_table(model, 1, 32)
    hv, nv = fair_values(table, stats.head_salience.numpy(), stats.salience.numpy())
    alloc = allocate(table, hv, nv, 0.5)
    assert alloc.share <= 0.5
    heads, neurons = sum(alloc.heads), sum(alloc.neurons)
    assert 0 < heads < 12 and 0 < neurons < 3 * 64
    # both kinds lose a comparable share of their cost (neither kind is emptied for the other)
    head_cost = sum(b.per_unit for b in table.attention) / 3 * heads
    neuron_cost = sum(b.per_unit for b in table.ffn) / 3 * neurons
    dense_h = sum(b.per_unit * b.units for b in table.attention)
    dense_n = sum(b.per_unit * b.units for b in table.ffn)
    assert 0.25 < head_cost / dense_h < 0.75 and 0.25 < neuron_cost / dense_n < 0.75
    # a larger head weight keeps at least as many heads
    hv2, _ = fair_values(table, stats.head_salience.numpy(), stats.salience.numpy(), head_weight=4.0)
    assert sum(allocate(table, hv2, nv, 0.5).heads) >= heads


def test_combined_table_is_the_mean_share():
    a = CostTable("macs", "macs", 1, 32, [BlockCost(4, 1.0, 2.0, 0.5)] * 2, [BlockCost(8, 0.0, 1.0)] * 2, 3.0)
    b = CostTable("macs", "macs", 32, 128, [BlockCost(4, 0.0, 9.0)] * 2, [BlockCost(8, 2.0, 4.0, 1.0)] * 2, 1.0)
    c = combined_table([a, b])
    for heads, neurons in (([4, 4], [8, 8]), ([0, 2], [3, 8]), ([1, 0], [0, 0])):
        mean = (estimated_latency(a, heads, neurons) + estimated_latency(b, heads, neurons)) / 2
        assert estimated_latency(c, heads, neurons) == pytest.approx(mean)
    other = CostTable("macs", "macs", 1, 1, [BlockCost(3, 0, 1)] * 2, [BlockCost(8, 0, 1)] * 2, 1.0)
    with pytest.raises(JointBudgetError, match="different architectures"):
        combined_table([a, other])


def test_share_grid_and_knee_snaps_to_a_grid_point():
    grid = share_grid(14, 0.25)
    assert len(grid) == 14 and grid[0] == 1.0 and grid[-1] == 0.25 and grid == sorted(grid, reverse=True)
    # plateau down to 0.55, then a steep drop: the knee lies near 0.55 and is one of the shares
    scores = [0.9 if s >= 0.55 else 0.9 - 2.0 * (0.55 - s) for s in grid]
    share, knee = knee_share(grid, scores)
    assert share in grid and 0.45 <= share <= 0.7
    assert knee.grid[0] == 250 and knee.grid[-1] == 1000
    with pytest.raises(JointBudgetError, match="at least 4"):
        share_grid(3)
    np.testing.assert_allclose(share_grid(4, 0.4), [1.0, 0.8, 0.6, 0.4])


def test_floor_share_bounds_every_allocation():
    a = CostTable("measured", "s", 1, 32, [BlockCost(4, 1.0, 2.0, 0.5), BlockCost(4, 3.0, 2.0, 0.5)],
                  [BlockCost(8, 0.5, 1.0)] * 2, 3.0)
    floor = floor_share(a)
    assert floor == pytest.approx((3.0 + 0.5 + 1.0 + 2.0) / a.dense_total())  # one head in layer 0, the cheaper
    rng = np.random.default_rng(0)
    hs, ns = rng.uniform(size=(2, 4)), rng.uniform(size=(2, 8))
    for target in (0.9, 0.5, 0.3, 0.22):  # the greedy may stop above the floor, never below it
        assert floor <= allocate(a, hs, ns, target).share <= target
    with pytest.raises(JointSelectionError, match="cannot be reached"):
        allocate(a, hs, ns, floor - 0.01)


def test_aim_each_bounds_every_shape_where_the_mean_target_does_not():
    """A batch-1-like table with large fixed costs shrinks slower than the average: a target on the averaged
    table leaves it above the target share, `aim_each` tightens the averaged target until it is within it."""
    slow = CostTable("measured", "s", 1, 32, [BlockCost(4, 3.0, 1.0, 2.5)] * 2, [BlockCost(8, 2.0, 0.5, 1.5)] * 2, 4.0)
    fast = CostTable("measured", "s", 32, 128, [BlockCost(4, 0.0, 9.0)] * 2, [BlockCost(8, 0.5, 4.0, 0.2)] * 2, 1.0)
    both = combined_table([slow, fast])
    rng = np.random.default_rng(0)
    hs, ns = rng.uniform(size=(2, 4)), rng.uniform(size=(2, 8))

    def worst(alloc):
        return worst_share((slow, fast), alloc.heads, alloc.neurons)

    target = 0.7
    mean_only = allocate(both, hs, ns, target)
    assert worst(mean_only) == max(estimated_latency(t, mean_only.heads, mean_only.neurons) for t in (slow, fast))
    assert mean_only.share <= target < worst(mean_only)  # the mean is within the target, the slow shape is not
    tries = []

    def select(share):
        tries.append(share)
        return allocate(both, hs, ns, share)

    alloc, aimed = aim_each(select, worst, target)
    assert worst(alloc) <= target and aimed < target and aimed == tries[-1]
    assert tries == sorted(tries, reverse=True) and 2 <= len(tries) <= 6
    # a shape that cannot get there within the tries, or a selection that fails, gives None
    assert aim_each(select, lambda a: 1.0, target, tries=3)[0] is None
    assert aim_each(lambda s: None, worst, target) == (None, target)
    with pytest.raises(JointBudgetError, match="in \\(0, 1\\]"):
        aim_each(select, worst, 1.5)


def test_target_speedup_at_each_shape(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """``--speedup-at each``: every cost shape's estimated speedup reaches the target, not only their mean."""
    each = replace(FAST, speedup_at="each", speedup_budget=0)
    cfg, ft = _cfgs(tiny_setup, tmp_path / "run", target_speedup=2.0, skip_final_finetune=True)
    rep = run_joint(cfg, ft, tmp_path / "run", progress=False, joint=each).report
    assert rep["k_source"] == "--target-speedup"
    assert min(rep["estimated_speedup"].values()) >= 2.0 - 1e-9, rep["estimated_speedup"]
    assert rep["settings"]["joint"]["speedup_at"] == "each"
