"""`cahp compare` end to end on the tiny BERT + synthetic task of test_pipeline (seconds)."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict

import numpy as np
import pytest
from benchmarks import bench_compare, make_results
from benchmarks._common import REPO, RESULTS_DIR

from cahp.cli import main as cli_main
from cahp.core.configs import from_args
from cahp.core.io import machine_label
from cahp.pipelines import cache, compare
from cahp.pipelines import stages as pipeline  # the stage functions tests patch live there
from cahp.pipelines.compare import CompareConfig, run_compare
from cahp.pipelines.prune import PruneConfig, run_prune
from cahp.pipelines.report import render_markdown
from cahp.pipelines.verdicts import compare_to_cahp, verdict
from cahp.train.finetune import FinetuneConfig

from .test_pipeline import tiny_setup  # noqa: F401  (module fixture: tiny model folder and task)


def _cfgs(root, out, epochs=1):
    cfg = PruneConfig(model=str(root / "model"), task=str(root / "task"), output_dir=str(out),
                      calibration_examples=64, curve_examples=80, stats_batch_size=16, grid_step=2)
    ft = FinetuneConfig(epochs=epochs, lr=2e-3, batch_size=16, seed=0, max_train_examples=96)
    return cfg, ft


def _check_verdicts(cmp: dict) -> None:
    for r in [cmp["pooled"], *cmp["per_seed"]]:
        lo, hi = r["ci95"]
        assert lo <= hi
        assert r["verdict"] == ("win" if hi < 0 else "loss" if lo > 0 else "tie")
    if "text" in cmp["pooled"]:
        assert ("tie" in cmp["pooled"]["text"]) == (cmp["pooled"]["verdict"] == "tie")


def test_verdict_rule_and_paired_comparison():
    assert verdict([-0.05, -0.01]) == "win"
    assert verdict([0.01, 0.05]) == "loss"
    assert verdict([-0.01, 0.02]) == "tie"
    assert verdict([0.0, 0.02]) == "tie"  # an interval touching 0 does not exclude it
    rng = np.random.default_rng(0)
    labels_ok = rng.random(500) < 0.8
    worse = labels_ok & (rng.random(500) < 0.7)  # strictly fewer correct examples
    r = compare_to_cahp([worse], [labels_ok], n_bootstrap=2000, seed=0)
    assert r["pooled"]["verdict"] == "win" and r["pooled"]["diff"] < 0
    r = compare_to_cahp([labels_ok], [labels_ok], n_bootstrap=2000, seed=0)
    assert r["pooled"]["verdict"] == "tie" and r["pooled"]["diff"] == 0
    # several seeds against one CAHP: pooled diff = mean accuracy difference; one per-seed test each
    seeds = [labels_ok, worse, labels_ok]
    r = compare_to_cahp(seeds, [labels_ok], n_bootstrap=2000, seed=0, seeds=[0, 1, 2])
    assert r["pooled"]["diff"] == pytest.approx(np.mean([s.mean() for s in seeds]) - labels_ok.mean())
    assert [p["seed"] for p in r["per_seed"]] == [0, 1, 2]
    assert r["per_seed_verdicts"] == {"win": 1, "tie": 2, "loss": 0}
    _check_verdicts(r)


def test_compare_end_to_end_and_resume(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "cmp"
    cfg, ft = _cfgs(tiny_setup, out)
    ccfg = CompareConfig(methods=["cahp", "gradient"], budgets=[0.5], seeds=1, knee=False, n_bootstrap=500)
    calls = {"finetune": 0}
    real_ft = compare.finetune

    def counting_ft(*a, **k):
        calls["finetune"] += 1
        return real_ft(*a, **k)

    monkeypatch.setattr(compare, "finetune", counting_ft)
    r = run_compare(cfg, ft, ccfg, progress=False).report
    for name in ("compare.json", "compare.md", "compare.png", "compare_layers.png", "run.json", "log.txt"):
        assert (out / name).is_file(), name
    assert calls["finetune"] == 3  # cahp, gradient, dense control (dense fine-tuning is pipeline's)
    assert [b["k"] for b in r["budgets"]] == [6] and r["heads"] == 12
    assert not r["partial"]
    ft_res = r["finetuned"]["results"]["50%"]
    nf_res = r["no_finetune"]["results"]["50%"]
    assert set(ft_res) == set(nf_res) == {"cahp", "gradient"}
    for part in (ft_res, nf_res):
        for method, s in part.items():
            assert sum(s["heads_per_layer"]) == 6 and 0 <= s["mean_relative_depth"] <= 1
            assert 0 <= s["accuracy"] <= 1
            assert ("vs_cahp" in s) == (method != "cahp")
        _check_verdicts(part["gradient"]["vs_cahp"])
    for label, cmp in r["finetuned"]["dense_control"]["vs_cahp"].items():
        assert label == "50%"
        _check_verdicts(cmp)
    # the no-fine-tuning curve covers the whole k grid for every method, CAHP's = the stage curve
    curves = r["no_finetune"]["curves"]
    stage = json.loads((out / "stages" / "curve-cahp.json").read_text())["points"]
    assert curves["cahp"]["ks"] == [p["k"] for p in stage] == curves["gradient"]["ks"]
    assert curves["cahp"]["accuracy"] == [p["accuracy"] for p in stage]
    md = (out / "compare.md").read_text()
    assert "| gradient |" in md and "Verdicts" in md and ("tie" in md or "win" in md or "loss" in md)
    labels = [json.loads(line)["label"] for line in (tiny_setup / "task" / "test.jsonl").read_text().splitlines()]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    assert r["data"]["test_majority_share"] == pytest.approx(majority)
    assert f"most frequent test label scores {100 * majority:.2f}%" in md
    assert "**one seed**" in md  # seeds=1 with fine-tuning: the caveat is printed
    saved = json.loads((out / "compare.json").read_text())
    assert saved["finetuned"]["results"]["50%"]["gradient"]["accuracy"] == ft_res["gradient"]["accuracy"]
    assert render_markdown(saved) == md  # the markdown is generated from the JSON alone
    assert saved["environment"]["cores"] == os.cpu_count()
    assert "epochs max" in md
    part_a = render_markdown({k: v for k, v in saved.items() if k != "finetuned"})
    assert "epochs max" not in part_a and "no fine-tuning after pruning" in part_a  # no settings of what never ran
    # RESULTS.md's overview: one row per (result, budget), CAHP's pooled verdict per baseline
    v = ft_res["gradient"]["vs_cahp"]["pooled"]
    bench = bench_compare
    both = {"a": {key: val for key, val in saved.items() if key != "finetuned"}, "b": saved}
    overview = bench.render_overview(both)
    for part in ("right after pruning", "after one fine-tuning"):  # the README's counts, one part at a time
        totals = bench.verdict_totals(both, part)
        assert all(sum(t.values()) == len(saved["budgets"]) for t in totals.values())
    assert bench.verdict_totals(both, "after one fine-tuning")["gradient"][v["verdict"]] >= 1
    name = f"{saved['model']} / {saved['task']}"
    assert f"| {name}, after one fine-tuning (1 seed) | 50% (6 of 12) | {v['verdict']} ({100 * v['diff']:+.1f}) |" \
        in overview
    assert f"| {name}, right after pruning (random over 1 seed) | 50% (6 of 12) |" in overview
    assert overview.splitlines()[-1].startswith("| **CAHP wins / ties / losses** | | ")
    t = saved["timings"]
    assert t["finetune_seconds"] > 0 and t["no_finetune_seconds"] > 0
    here = machine_label()
    assert list(t["seconds_by_machine"]) == [here]
    assert t["seconds_by_machine"][here] == pytest.approx(t["finetune_seconds"] + t["no_finetune_seconds"], abs=0.5)
    assert f"Computed on: {here}:" in md

    # a re-run computes nothing: every (method, budget, seed) result comes from OUTPUT/compare
    def boom(*a, **k):
        raise AssertionError("should come from the cache")

    for name in ("finetune", "evaluate_task", "score_mask"):
        monkeypatch.setattr(compare, name, boom)
    for name in ("finetune", "collect_signatures", "gate_gradients", "selection_curve"):
        monkeypatch.setattr(pipeline, name, boom)
    monkeypatch.setattr(cache, "machine_label", lambda: "another machine")
    r2 = run_compare(cfg, ft, ccfg, progress=False).report
    assert r2["timings"]["results_computed"] == 0 and r2["timings"]["results_cached"] > 0
    # cached results keep the machine that computed them, not the one assembling the report
    assert r2["timings"]["seconds_by_machine"] == t["seconds_by_machine"]
    assert r2["finetuned"] == r["finetuned"] and r2["no_finetune"] == r["no_finetune"]


def test_every_fine_tuning_of_prune_and_compare_keeps_an_epoch_checkpoint(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """The dense model's, the final model's and each compared method's fine-tuning write an epoch checkpoint
    named after their stage (so an interruption loses at most one epoch), and none is left once they end."""
    from cahp.train.resume import EpochCheckpoint

    saved, real = [], EpochCheckpoint.save

    def recording(self, state):
        saved.append(self.path.name)
        return real(self, state)

    monkeypatch.setattr(EpochCheckpoint, "save", recording)
    out = tmp_path / "run"
    cfg, ft = _cfgs(tiny_setup, out, epochs=2)
    ft.patience = 0
    run_prune(cfg, ft, progress=False)
    assert set(saved) == {"finetune_dense.epoch.pt", "final.epoch.pt"}
    saved.clear()
    run_compare(cfg, ft, CompareConfig(methods=["cahp", "gradient"], budgets=[0.5], seeds=1, knee=False,
                                       n_bootstrap=50), progress=False)
    assert {"ft-dense-s0.epoch.pt", "ft-cahp-k6-s0.epoch.pt", "ft-gradient-k6-s0.epoch.pt"} <= set(saved)
    assert not list(out.rglob("*.epoch.pt"))


def test_compare_resumes_after_interruption(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "cmp"
    cfg, ft = _cfgs(tiny_setup, out)
    ccfg = CompareConfig(methods=["cahp", "random"], budgets=[0.25], seeds=2, knee=False, dense_control=False,
                         n_bootstrap=200)
    real_ft = compare.finetune
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_ft(*a, **k)

    monkeypatch.setattr(compare, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, ft, ccfg, progress=False)
    assert json.loads((out / "compare.json").read_text())["partial"]  # part (a) was written
    done = sorted(p.name for p in (out / "compare").glob("ft-*.json"))
    assert len(done) == 2
    calls["n"] = 0
    monkeypatch.setattr(compare, "finetune", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1),
                                                              real_ft(*a, **k))[1])
    r = run_compare(cfg, ft, ccfg, progress=False).report
    assert calls["n"] == 2  # only the two missing fine-tunings (2 methods x 2 seeds in all)
    res = r["finetuned"]["results"]["25%"]
    assert res["random"]["seeds"] == [0, 1] and len(res["random"]["accuracy_per_seed"]) == 2
    assert len(res["random"]["vs_cahp"]["per_seed"]) == 2
    # random differs across seeds without fine-tuning, one curve per seed
    per_seed = r["no_finetune"]["curves"]["random"]["per_seed"]
    assert set(per_seed) == {"0", "1"}
    assert r["no_finetune"]["results"]["25%"]["random"]["kept"] is not None
    # the layer distribution of a seeded method is a mean over seeds, shown to one decimal
    r["no_finetune"]["results"]["25%"]["random"]["heads_per_layer_mean"] = [2 / 3, 1.0, 4 / 3]
    assert "| random | 0.7 1 1.3 (depth" in render_markdown(r)


def test_compare_in_prune_folder_via_cli(tiny_setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "run"
    cfg, ft = _cfgs(tiny_setup, out, epochs=2)
    cfg.skip_final_finetune = True
    run_prune(cfg, ft, progress=False)

    def boom(*a, **k):
        raise AssertionError("should come from the prune run's stages")

    for name in ("finetune", "collect_signatures", "gate_gradients"):
        monkeypatch.setattr(pipeline, name, boom)
    real_curve, curves_made = pipeline.selection_curve, []

    def counting_curve(model, selector, *a, **k):
        curves_made.append(selector.name)
        return real_curve(model, selector, *a, **k)

    monkeypatch.setattr(pipeline, "selection_curve", counting_curve)
    # the fine-tuning after pruning uses --epochs 1; the dense model keeps run.json's 2 epochs
    code = cli_main(["compare", "--model", cfg.model, "--task", cfg.task, "--output-dir", str(out),
                     "--calibration-examples", "64", "--curve-examples", "80", "--stats-batch-size", "16",
                     "--grid-step", "2", "--epochs", "1", "--lr", "2e-3", "--batch-size", "16",
                     "--methods", "entropy", "magnitude", "--budgets", "0.25", "--no-finetune", "--seeds", "1",
                     "--n-bootstrap", "200"])
    assert code == 0
    r = json.loads((out / "compare.json").read_text())
    assert r["settings"]["finetune_dense"]["epochs"] == 2 and r["settings"]["finetune_after"]["epochs"] == 1
    assert r["finetuned"] is None
    assert [b["label"] for b in r["budgets"]] == ["k*", "25%"]
    assert r["k_star"] == json.loads((out / "report.json").read_text())["k_star"]
    assert set(r["no_finetune"]["results"]["25%"]) == {"cahp", "entropy", "magnitude"}
    # CAHP's curve is the prune run's stage, found by the same lookup as every method's; only the others are new
    assert sorted(curves_made) == ["entropy", "magnitude"]
    stage = json.loads((out / "stages" / "curve-cahp.json").read_text())["points"]
    assert r["no_finetune"]["curves"]["cahp"]["accuracy"] == [p["accuracy"] for p in stage]
    assert "CAHP" in capsys.readouterr().out


def test_readme_results_sections_match_the_results_files():
    """The README's generated sections are what make_results.py makes from the committed results (never typed)."""
    readme = (REPO / "README.md").read_text()
    for name, make in make_results.README_SECTIONS:
        start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
        body = make()
        assert body is not None and start in readme, name
        assert readme.split(start, 1)[1].split(end, 1)[0] == "\n".join(body), f"README section {name} is stale"


def test_benchmark_commands_reproduce_their_recorded_settings():
    """bench_compare takes cahp compare's own options: every committed result's command still parses to the
    comparison settings that result records."""
    bench = bench_compare
    files = sorted(RESULTS_DIR.glob("compare_*.json"))
    assert files
    for f in files:
        r = json.loads(f.read_text())
        argv = shlex.split(r["meta"]["command"])
        script = next(i for i, a in enumerate(argv) if a.endswith("bench_compare.py"))
        args = bench.build_parser().parse_args(argv[script + 1:])
        parsed, recorded = asdict(from_args(CompareConfig, args)), r["bench_settings"]["compare"]
        # settings added after a result was made take their defaults, which the result ran without
        assert {k: v for k, v in parsed.items() if k in recorded} == recorded, f.name
        assert {k: v for k, v in parsed.items() if k not in recorded} == \
            {k: v for k, v in asdict(CompareConfig()).items() if k not in recorded}, f.name
