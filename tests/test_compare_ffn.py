"""Joint methods behind `JointMethod` and `cahp compare --ffn` on a tiny random model and a tiny synthetic task."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cahp.budget.cost import BlockCost, CostTable, estimated_latency
from cahp.pipelines import compare_ffn
from cahp.pipelines.compare import CompareConfig, run_compare
from cahp.pipelines.joint_config import JointConfig, JointSetupError
from cahp.pipelines.prune import PruneConfig
from cahp.selectors.joint import JointSelectionError
from cahp.selectors.joint_base import HeldOut, JointProblem, JointSelection, check_selection
from cahp.selectors.registry import JOINT_METHODS, make_joint_method
from cahp.stats.neurons import ActivationCorrelationAccumulator, NeuronStats
from cahp.train.finetune import FinetuneConfig
from tests.test_pipeline import tiny_setup  # noqa: F401  (the fixture: a tiny BERT and a synthetic task)

L, H, F = 3, 4, 16


def _table() -> CostTable:
    att = [BlockCost(units=H, fixed=1.0, per_unit=1.0, empty=0.1) for _ in range(L)]
    ffn = [BlockCost(units=F, fixed=1.0, per_unit=0.5, empty=0.1) for _ in range(L)]
    return CostTable(source="macs", unit="macs", batch=1, seq=8, attention=att, ffn=ffn, rest=1.0)


def _problem(seed: int = 0, score=None) -> JointProblem:
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(200, F))
    corr, const = [], []
    for _ in range(L):
        acc = ActivationCorrelationAccumulator(F, torch.float64)
        acc.add_batch(torch.tensor(acts + 0.3 * rng.normal(size=acts.shape)))
        r = acc.result()
        corr.append(r["correlation"])
        const.append(r["constant"])
    ns = NeuronStats(neuron_ids=[list(range(F))] * L, salience=torch.tensor(rng.uniform(size=(L, F))),
                     fisher=torch.tensor(rng.uniform(size=(L, F))), correlation=corr, constant=const)
    n = L * H
    D = rng.uniform(0.1, 1.0, size=(n, n))
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0)
    return JointProblem(table=_table(), head_salience=rng.uniform(size=(L, H)), head_fisher=rng.uniform(size=(L, H)),
                        neuron_salience=ns.salience.numpy(), neuron_fisher=ns.fisher.numpy(),
                        heads_present=np.ones((L, H), bool), neurons_present=np.ones((L, F), bool),
                        head_distances=D, head_ids=[(i, h) for i in range(L) for h in range(H)], neuron_stats=ns,
                        score=score, seed=seed)


STATS_ONLY = [m for m in JOINT_METHODS if not m.startswith("fisher")]  # Kwon's needs a model: tests/test_joint_fisher


@pytest.mark.parametrize("name", STATS_ONLY)
@pytest.mark.parametrize("share", [0.9, 0.6, 0.4])
def test_every_method_meets_the_share_with_units_the_model_holds(name, share):
    problem = _problem()
    sel = make_joint_method(name, 0).select(share, problem)
    got = check_selection(sel, problem, share, who=name)
    assert got <= share + 1e-9
    again = make_joint_method(name, 0).select(share, problem)  # deterministic for a fixed seed
    assert again.heads == sel.heads and again.neurons == sel.neurons


def test_check_selection_refuses_what_breaks_the_contract():
    problem = _problem()
    full = {i: list(range(H)) for i in range(L)}
    with pytest.raises(ValueError, match="above its target"):
        check_selection(JointSelection(heads=full, neurons={i: list(range(F)) for i in range(L)}), problem, 0.5)
    with pytest.raises(ValueError, match="keeps no head"):
        check_selection(JointSelection(heads={}, neurons={}), problem, 0.9)
    absent = _problem()
    absent.heads_present[0, 0] = False
    with pytest.raises(ValueError, match="does not hold"):
        check_selection(JointSelection(heads={0: [0]}, neurons={}), absent, 0.9)


def test_layer_drop_keeps_whole_leading_layers_and_random_follows_its_seed():
    problem = _problem()
    sel = make_joint_method("layer-drop").select(0.6, problem)
    kept_layers = sel.info["layers_kept"]
    assert all(sel.heads[i] == list(range(H)) and sel.neurons[i] == list(range(F)) for i in range(kept_layers))
    assert all(not sel.heads[i] and not sel.neurons[i] for i in range(kept_layers, L))
    # one more layer would not fit
    heads = [H if i <= kept_layers else 0 for i in range(L)]
    assert kept_layers == L or estimated_latency(problem.table, heads, [F if h else 0 for h in heads]) > 0.6
    a, b = (make_joint_method("random", s).select(0.5, problem) for s in (0, 1))
    assert (a.heads, a.neurons) != (b.heads, b.neurons)


def test_p_pruning_keeps_one_ratio_in_every_layer():
    sel = make_joint_method("p-pruning").select(0.6, _problem())
    heads, neurons = sel.counts(L)
    assert len(set(heads)) == 1 and len(set(neurons)) == 1 and 0 < sel.info["ratio"] < 1


def test_gradient_keeps_each_layers_most_salient_units():
    problem = _problem()
    sel = make_joint_method("gradient").select(0.6, problem)
    for i in range(L):
        k = len(sel.neurons[i])
        assert sorted(sel.neurons[i]) == sorted(np.argsort(-problem.neuron_salience[i])[:k].tolist())


def test_cahp_picks_the_best_scoring_head_weight():
    calls = []

    def score(sel):  # prefers selections keeping more heads
        calls.append(sel)
        return sum(len(v) for v in sel.heads.values())

    problem = _problem(score=score)
    method = make_joint_method("cahp", shared={"head_weights": (0.5, 1.0, 2.0)})
    sel = method.select(0.6, problem)
    cands = sel.info["candidates"]
    assert [c["head_weight"] for c in cands] == [1.0, 0.5, 2.0]
    assert sel.info["heldout_score"] == max(c["heldout_score"] for c in cands)
    n_calls = len(calls)
    method.select(0.6, problem)  # memoised by counts: nothing scored twice
    assert len(calls) == n_calls
    # without a scorer only the neutral weight is tried
    assert make_joint_method("cahp").select(0.6, _problem()).info["head_weight"] == 1.0


def test_cahp_chooses_the_split_by_held_out_loss_where_scores_tie():
    """Every candidate at chance accuracy (a tie): the loss decides, not the tie rule; ``choose_by="score"``
    and a scorer without a loss fall back to the score and its tie rule (the neutral weight)."""
    def held(sel):  # the same accuracy for all; the loss falls with the heads kept
        return HeldOut(score=0.3, loss=10.0 / (1 + sum(len(v) for v in sel.heads.values())))

    problem = _problem(score=held)
    sel = make_joint_method("cahp", shared={"head_weights": (0.5, 1.0, 2.0)}).select(0.6, problem)
    cands = sel.info["candidates"]
    heads = {c["head_weight"]: c for c in cands}
    assert len({c["heldout_loss"] for c in cands}) > 1  # the split matters to the loss here
    assert sel.info["heldout_loss"] == min(c["heldout_loss"] for c in cands)
    chosen = sel.info["head_weight"]
    assert chosen != 1.0 and heads[chosen]["heldout_loss"] < heads[1.0]["heldout_loss"]
    assert make_joint_method("cahp", shared={"choose_by": "score"}).select(0.6, problem).info["head_weight"] == 1.0
    bare = _problem(score=lambda sel: 0.3)  # a bare score: no loss to compare
    assert make_joint_method("cahp").select(0.6, bare).info["head_weight"] == 1.0
    with pytest.raises(JointSelectionError, match="choose_by"):
        make_joint_method("cahp", shared={"choose_by": "accuracy"})


def test_cahp_keeps_the_neutral_weight_where_no_split_beats_the_constant_predictor():
    """Every split's loss at or above ``chance_loss`` (collapsed outputs): the losses' order is calibration noise,
    so the neutral weight is kept (``collapsed="lowest"``: the lowest loss all the same); as soon as one split's
    loss is below it, the lowest loss decides again."""
    def held(sel):  # the loss falls with the heads kept, every value between 1.10 and 1.11
        return HeldOut(score=0.3, loss=1.10 + 0.01 / (1 + sum(len(v) for v in sel.heads.values())))

    method = make_joint_method("cahp", shared={"head_weights": (0.5, 1.0, 2.0)})
    lowest = make_joint_method("cahp", shared={"head_weights": (0.5, 1.0, 2.0), "collapsed": "lowest"})
    free = lowest.select(0.6, _problem(score=held))  # no bound: the lowest loss
    assert free.info["head_weight"] != 1.0 and not free.info["collapsed"] and not free.info["neutral_fallback"]
    collapsed = _problem(score=held)
    collapsed = replace(collapsed, chance_loss=1.0986)  # ln 3: every loss above it
    sel = method.select(0.6, collapsed)
    assert sel.info["head_weight"] == 1.0 and sel.info["collapsed"] and sel.info["neutral_fallback"]
    assert sel.info["chance_loss"] == 1.0986
    same = lowest.select(0.6, collapsed)
    assert same.info["head_weight"] == free.info["head_weight"] and same.info["collapsed"]
    assert not same.info["neutral_fallback"]
    informative = replace(_problem(score=held), chance_loss=free.info["heldout_loss"] + 1e-9)  # one below
    again = make_joint_method("cahp", shared={"head_weights": (0.5, 1.0, 2.0)}).select(0.6, informative)
    assert again.info["head_weight"] == free.info["head_weight"] and not again.info["collapsed"]
    with pytest.raises(JointSelectionError, match="collapsed"):
        make_joint_method("cahp", shared={"collapsed": "first"})


def test_cahp_keeps_the_split_closest_to_the_dense_states_where_every_loss_is_at_chance():
    """``collapsed="fidelity"`` (the default): every loss at chance, the split of highest hidden-state fidelity is
    kept, whatever the losses say; a candidate without a fidelity falls back to the neutral weight; an
    informative loss still decides by itself."""
    def held(sel):  # losses prefer more heads; fidelity prefers more neurons
        heads = sum(len(v) for v in sel.heads.values())
        neurons = sum(len(v) for v in sel.neurons.values())
        return HeldOut(score=0.3, loss=1.10 + 0.01 / (1 + heads), fidelity=neurons / (1.0 + neurons))

    weights = {"head_weights": (0.5, 1.0, 2.0)}
    assert make_joint_method("cahp", shared=weights).collapsed == "fidelity"
    collapsed = replace(_problem(score=held), chance_loss=1.0986)
    sel = make_joint_method("cahp", shared=weights).select(0.6, collapsed)
    cands = sel.info["candidates"]
    assert len({c["heldout_fidelity"] for c in cands}) > 1  # the split matters to the fidelity here
    assert sel.info["decided_by"] == "fidelity" and sel.info["collapsed"] and not sel.info["neutral_fallback"]
    assert sel.info["heldout_fidelity"] == max(c["heldout_fidelity"] for c in cands)
    lowest = make_joint_method("cahp", shared={**weights, "collapsed": "lowest"}).select(0.6, collapsed)
    assert lowest.info["head_weight"] != sel.info["head_weight"]  # the two signals disagree on this problem
    bare = replace(_problem(score=lambda s: HeldOut(score=0.3, loss=1.2)), chance_loss=1.0986)  # no fidelity
    fallback = make_joint_method("cahp", shared=weights).select(0.6, bare)
    assert fallback.info["head_weight"] == 1.0 and fallback.info["decided_by"] == "neutral"
    informative = replace(_problem(score=held), chance_loss=2.0)  # every loss below chance: the loss decides
    again = make_joint_method("cahp", shared=weights).select(0.6, informative)
    assert again.info["decided_by"] == "loss" and again.info["head_weight"] == lowest.info["head_weight"]


def test_cahp_keeps_the_split_with_the_most_heads_where_every_loss_is_at_chance_under_the_heads_rule():
    """``collapsed="heads"``: every loss at chance, the candidate keeping the most heads is kept whatever the
    losses and fidelities say; an informative loss still decides by itself; the report says which rule chose."""
    from cahp.pipelines.report_ffn import candidate_lines

    def held(sel):  # losses and fidelities both prefer fewer heads here
        heads = sum(len(v) for v in sel.heads.values())
        return HeldOut(score=0.3, loss=1.10 + 0.001 * heads, fidelity=1.0 / (1 + heads))

    shared = {"head_weights": (0.5, 1.0, 2.0), "collapsed": "heads"}
    collapsed = replace(_problem(score=held), chance_loss=1.0986)
    sel = make_joint_method("cahp", shared=shared).select(0.6, collapsed)
    kept = {c["head_weight"]: c for c in sel.info["candidates"]}
    heads = sum(len(v) for v in sel.heads.values())
    assert sel.info["decided_by"] == "heads" and sel.info["collapsed"]
    fidelity = make_joint_method("cahp", shared={**shared, "collapsed": "fidelity"}).select(0.6, collapsed)
    assert heads > sum(len(v) for v in fidelity.heads.values())  # the two rules disagree on this problem
    assert sel.info["head_weight"] == max(kept)  # the largest head weight keeps the most heads here
    line = candidate_lines({"info": sel.info})[0]
    assert "chosen by the most heads kept (no loss below the constant predictor's 1.0986)" in line
    informative = replace(_problem(score=held), chance_loss=2.0)
    again = make_joint_method("cahp", shared=shared).select(0.6, informative)
    assert again.info["decided_by"] == "loss" and again.info["head_weight"] == fidelity.info["head_weight"]


def test_unreachable_share_is_a_clear_error():
    for name in STATS_ONLY:
        with pytest.raises(JointSelectionError):
            make_joint_method(name, 0).select(0.05, _problem())


FAST = JointConfig(cost_source="macs", cost_shapes="1x16,4x32", grid_points=5, min_share=0.4, speedup_budget=0.2)


def _cfgs(root, out):
    cfg = PruneConfig(model=str(root / "model"), task=str(root / "task"), output_dir=str(out), ffn=True,
                      calibration_examples=64, curve_examples=80, stats_batch_size=16)
    return cfg, FinetuneConfig(epochs=1, lr=2e-3, batch_size=16, seed=0)


def test_compare_ffn_end_to_end_and_cached_rerun(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    cfg, ft = _cfgs(tiny_setup, out)
    ccfg = CompareConfig(methods=["cahp", "fisher", "layer-drop", "random"], speedups=[1.5], seeds=2,
                         n_bootstrap=200)
    r = run_compare(cfg, ft, ccfg, progress=False, joint=FAST).report
    assert r["ffn"] and not r["partial"]
    assert [t["label"] for t in r["targets"]] == ["knee", "1.5x"]
    for t in r["targets"]:
        rows = r["results"][t["label"]]
        assert list(rows)[0] == "cahp" and set(rows) == {"cahp", "fisher", "layer-drop", "random"}
        for m, row in rows.items():
            if "unreachable" in row:
                continue
            assert row["estimated_share"] <= t["share"] + 1e-9, (m, t)
            assert set(row["measured_speedup"]) == {"1x16", "4x32"}
            assert len(row["finetuned"]["accuracy_per_seed"]) == 2
            if m != "cahp":
                assert row["finetuned"]["vs_cahp"]["pooled"]["verdict"] in ("win", "tie", "loss")
    assert len(r["dense"]["control"]["accuracy_per_seed"]) == 2
    assert r["heads_only"]["k"] >= 1 and "finetuned" in r["heads_only"]
    for name in ("compare_ffn.json", "compare_ffn.md", "frontier.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "compare_ffn.json").read_text())["results"] == json.loads(json.dumps(r["results"]))
    # the benchmark renders the report (tables and the frontier figure, regenerated from the file)
    from benchmarks import bench_frontier
    from benchmarks._common import metadata

    monkeypatch.setattr(bench_frontier, "IMAGES", tmp_path / "images")
    text = bench_frontier.render({"meta": metadata(), "configuration": "tiny", **r})
    assert "![frontier](docs/images/frontier_tiny.png)" in text and (tmp_path / "images/frontier_tiny.png").is_file()
    assert "| cahp |" in text and "Heads-only CAHP" in text
    assert "with the best held-out loss (cross-entropy" in text  # the split rule, from the report's settings
    assert "units kept in a layer: by salience discounted by nearness" in text  # the within-layer rule
    # the prices the cost tables gave one head and one neuron, per shape
    assert r["cost_table"]["shapes"] == ["1x16", "4x32"]
    assert all(v["head_share"] > v["neuron_share"] > 0 for v in r["cost_table"]["per_shape"].values())
    assert "Cost tables, macs: at 1x16 one head " in text and "at 4x32 one head" in text
    # a report from before choose_by and within existed chose by the held-out score and kept cluster
    # representatives, and says so
    old = {**r, "settings": {**r["settings"], "joint": {k: v for k, v in r["settings"]["joint"].items()
                                                          if k not in ("choose_by", "within")}}}
    old_text = bench_frontier.render({"meta": metadata(), "configuration": "tiny", **old})
    assert "with the best held-out score (the curve's metric)" in old_text
    assert "units kept in a layer: one most salient member of each of the layer's clusters" in old_text
    no_prices = {**r, "cost_table": {"source": "macs", "shapes": r["cost_table"]["shapes"]}}  # before cost_summary
    assert "Cost tables" not in bench_frontier.render({"meta": metadata(), "configuration": "tiny", **no_prices})
    # a re-run computes nothing: every selection, timing and fine-tuning comes from the cache
    for name in ("finetune", "measure_speedup", "build_pruned"):
        monkeypatch.setattr(compare_ffn, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = run_compare(cfg, ft, ccfg, progress=False, joint=FAST).report
    assert again["results"] == r["results"] and again["timings"]["results_computed"] == 0


def test_changing_cahps_split_rule_recomputes_only_cahps_selection(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """``choose_by`` is CAHP's alone: a re-run with another rule recomputes CAHP's selection, while the baseline's
    selection and fine-tuning, the dense control and CAHP's fine-tuning (one head weight: the same units, only
    the selection's description differs) come from the cache."""
    out = tmp_path / "run"
    cfg, ft = _cfgs(tiny_setup, out)
    ccfg = CompareConfig(methods=["cahp", "random"], speedups=[1.5], seeds=1, knee=False, n_bootstrap=50)
    joint = replace(FAST, head_weights="1")
    first = run_compare(cfg, ft, ccfg, progress=False, joint=joint).report
    monkeypatch.setattr(compare_ffn, "finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = run_compare(cfg, ft, ccfg, progress=False, joint=replace(joint, choose_by="score")).report
    rows, rows0 = again["results"]["1.5x"], first["results"]["1.5x"]
    assert rows["random"] == rows0["random"] and again["dense"] == first["dense"]
    assert rows["cahp"]["finetuned"] == rows0["cahp"]["finetuned"]
    assert rows["cahp"]["info"]["choose_by"] == "score" and rows0["cahp"]["info"]["choose_by"] == "loss"
    assert again["timings"]["results_computed"] == 1  # CAHP's selection alone
    lowest = run_compare(cfg, ft, ccfg, progress=False, joint=replace(joint, collapsed="lowest")).report
    assert lowest["results"]["1.5x"]["random"] == rows0["random"] and lowest["timings"]["results_computed"] == 1
    chance = rows0["cahp"]["info"]["chance_loss"]  # the curve data's constant predictor: a class-frequency entropy
    assert 0 < chance <= math.log(2) + 1e-12
    # the within-layer rule is CAHP's alone too: only its selection is recomputed
    monkeypatch.undo()
    other = run_compare(cfg, ft, ccfg, progress=False, joint=replace(joint, within="clusters")).report
    assert other["results"]["1.5x"]["random"] == rows0["random"] and other["dense"] == first["dense"]
    assert other["settings"]["joint"]["within"] == "clusters" and first["settings"]["joint"]["within"] == "greedy"
    assert 1 <= other["timings"]["results_computed"] <= 2  # CAHP's selection, and its fine-tuning if its units differ
    # and so are its head weights
    weights = run_compare(cfg, ft, ccfg, progress=False, joint=replace(joint, head_weights="2")).report
    assert weights["results"]["1.5x"]["random"] == rows0["random"] and weights["dense"] == first["dense"]
    assert weights["results"]["1.5x"]["cahp"]["info"]["head_weight"] == 2.0
    assert 1 <= weights["timings"]["results_computed"] <= 2


def test_speedup_targets_at_each_shape_are_their_own_selections(tiny_setup, tmp_path):  # noqa: F811
    """``speedup_at="each"``: every method reaches the target at every shape (the knee stays a point of the mean
    axis), and its selections are cached apart from the mean's."""
    out = tmp_path / "run"
    cfg, ft = _cfgs(tiny_setup, out)
    ccfg = CompareConfig(methods=["cahp", "random"], speedups=[1.6], seeds=1, n_bootstrap=50, finetune=False)
    joint = replace(FAST, speedup_budget=0)
    mean = run_compare(cfg, ft, ccfg, progress=False, joint=joint).report
    each = run_compare(cfg, ft, ccfg, progress=False, joint=replace(joint, speedup_at="each")).report
    assert [t.get("at") for t in each["targets"]] == [None, "each"]
    assert each["results"]["knee"] == mean["results"]["knee"]  # the knee's selections come from the cache
    for m, row in each["results"]["1.6x"].items():
        assert min(row["estimated_speedup"].values()) >= 1.6 - 1e-9, (m, row["estimated_speedup"])
        assert row["estimated_share"] <= 1 / 1.6 + 1e-9
        assert row.get("aimed_share", 1 / 1.6) <= 1 / 1.6  # where the mean's target was tightened, by how much
    # the mean's target bounds the mean only: some shape is below 1.6x there, so each recomputed it
    assert any(min(r["estimated_speedup"].values()) < 1.6 for r in mean["results"]["1.6x"].values())
    assert any("aimed_share" in r for r in each["results"]["1.6x"].values())
    assert not any("aimed_share" in r for r in mean["results"]["1.6x"].values())
    assert each["timings"]["results_computed"] == 2
    from cahp.pipelines.report_ffn import render_ffn_markdown

    assert "## 1.6x (estimated share 0.625, at most at every shape" in render_ffn_markdown(each)
    assert "## 1.6x (estimated share 0.625, the shapes' mean)" in render_ffn_markdown(mean)


def test_compare_ffn_refuses_heads_only_methods_and_bad_targets(tiny_setup, tmp_path):  # noqa: F811
    cfg, ft = _cfgs(tiny_setup, tmp_path / "r")
    with pytest.raises(JointSetupError, match="no joint"):
        run_compare(cfg, ft, CompareConfig(methods=["cahp", "entropy"]), progress=False, joint=FAST)
    with pytest.raises(JointSetupError, match="above 1"):
        run_compare(cfg, ft, CompareConfig(speedups=[0.5]), progress=False, joint=FAST)
    assert not (tmp_path / "r").exists()


def test_command_line_takes_the_joint_peers(tmp_path, capsys):
    from cahp.cli import main

    # p-pruning is a joint peer only: the parser takes it, and the one-line error is about the bad target
    out = str(tmp_path / "o")
    code = main(["compare", "--ffn", "--methods", "p-pruning", "--speedups", "0.5", "--output-dir", out])
    assert code != 0 and "--speedups must be above 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_2x_speed_goal_judges_2x_and_faster_targets_and_the_knee_only():
    from cahp.pipelines.report_ffn import goal_lines

    fast = {"speedup": 1.55, "ci95": [1.51, 1.60]}
    rows = {"cahp": {"measured_speedup": {"1x32": fast}}}
    report = {"results": {"1.5x": rows, "2x": rows, "knee": rows}, "settings": {"seeds": [0]}, "dense": {}}
    slow = goal_lines(report, {"label": "1.5x", "share": 2 / 3, "speedup": 1.5}, ["1x32"])[0]
    assert "1.55x [1.51, 1.60]" in slow and "not met" not in slow and "does not apply" in slow
    for label, share in (("2x", 0.5), ("knee", 0.7)):
        line = goal_lines(report, {"label": label, "share": share, "speedup": 1 / share}, ["1x32"])[0]
        assert "1.55x [1.51, 1.60] (not met)" in line and "at least 2.0x" in line


def test_the_report_lists_cahps_split_candidates_and_how_far_apart_their_losses_are():
    from cahp.pipelines.report_ffn import candidate_lines

    cands = [{"head_weight": 1.0, "heldout_score": 0.183, "heldout_loss": 1.5911},
             {"head_weight": 0.5, "heldout_score": 0.183, "heldout_loss": 1.5904},
             {"head_weight": 2.0, "heldout_score": 0.183, "heldout_loss": 1.5913}]
    (line,) = candidate_lines({"info": {"head_weight": 0.5, "choose_by": "loss", "candidates": cands}})
    assert line == ("- CAHP's split: head weight 0.5, chosen by held-out loss among 1 (score 0.183, loss 1.5911), "
                    "0.5 (score 0.183, loss 1.5904), 2 (score 0.183, loss 1.5913); the losses span 0.0009.")
    # results from before the loss rule: chosen by the score, no losses recorded
    old = [{k: v for k, v in c.items() if k != "heldout_loss"} for c in cands]
    (line,) = candidate_lines({"info": {"head_weight": 1.0, "candidates": old}})
    assert "chosen by held-out score" in line and "loss -)" in line and "span" not in line
    info = {"head_weight": 1.0, "choose_by": "loss", "candidates": cands, "chance_loss": 1.5683, "collapsed": True}
    (line,) = candidate_lines({"info": {**info, "neutral_fallback": True}})
    assert line.startswith("- CAHP's split: head weight 1, chosen by the neutral rule (no loss below the constant "
                           "predictor's 1.5683) among 1 (score 0.183")
    (line,) = candidate_lines({"info": {**info, "head_weight": 0.5, "neutral_fallback": False}})
    assert "chosen by held-out loss (none below the constant predictor's 1.5683) among" in line
    fid = [{**c, "heldout_fidelity": f} for c, f in zip(cands, (0.61, 0.58, 0.64), strict=True)]
    (line,) = candidate_lines({"info": {**info, "candidates": fid, "head_weight": 2.0, "decided_by": "fidelity"}})
    assert line.startswith("- CAHP's split: head weight 2, chosen by hidden-state fidelity to the dense model (no "
                           "loss below the constant predictor's 1.5683) among 1 (score 0.183, loss 1.5911, "
                           "fidelity 0.6100), 0.5")
    assert candidate_lines({"info": {"head_weight": 1.0, "candidates": cands[:1]}}) == []  # nothing was chosen
    assert candidate_lines({}) == []


def test_a_single_head_weight_is_reported_as_fixed_not_chosen():
    from cahp.pipelines.report_ffn import fixed_weight, split_rule

    one, many = ({"settings": {"joint": {"head_weights": w, "choose_by": "loss"}}} for w in ("2", "0.5,1,2"))
    assert fixed_weight(one) == "2" and fixed_weight(many) is None and fixed_weight({"settings": {}}) is None
    assert split_rule(one) == "the head weight fixed at 2 (--head-weights: no choice)"
    assert split_rule(many).startswith("the head weight of 0.5,1,2 with the best held-out loss")
    assert "neutral" not in split_rule(many)  # reports from before the collapsed rule kept the lowest loss
    neutral = {"settings": {"joint": {"head_weights": "0.5,1,2", "choose_by": "loss", "collapsed": "neutral"}}}
    assert split_rule(neutral).endswith("the neutral weight 1 where no loss is below the best constant predictor's "
                                        "(collapsed outputs: the data cannot choose)")
    fidelity = {"settings": {"joint": {"head_weights": "0.5,1,2", "choose_by": "loss", "collapsed": "fidelity"}}}
    assert split_rule(fidelity).endswith("the last hidden states closest to the dense model's (mean cosine over "
                                         "real tokens) where no loss is below the best constant predictor's "
                                         "(collapsed outputs: the labels cannot choose)")
