"""`cahp compare` on a grouped-query decoder: KV-group methods, perplexity verdicts, speed, cache, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
from benchmarks import bench_decoder, make_results
from benchmarks._common import metadata

from cahp.bench.decode import DecodeTimingConfig
from cahp.core.io import read_json
from cahp.pipelines import compare_decoder
from cahp.pipelines.compare import DEFAULT_METHODS, CompareConfig, run_compare
from cahp.pipelines.compare_decoder import kv_budgets, kv_methods, run_compare_decoder
from cahp.pipelines.prune import PruneConfig, run_prune
from cahp.selectors.registry import KV_SELECTORS
from cahp.train.finetune import FinetuneConfig

from .test_decoder_prune import write_decoder_folder

TIMING = DecodeTimingConfig(seconds=0.01, new_tokens=4, prompt_tokens=6, batch_sizes=[1, 2], prefill_tokens=16,
                            min_reps=3, max_reps=5, n_bootstrap=100)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """(root with model/ (a tiny Llama, 3 layers x 3 KV heads, groups of 2 query heads) and task/ (jsonl))."""
    root = tmp_path_factory.mktemp("compare_decoder")
    return write_decoder_folder(root, (80, 30, 10), seed=10)


def _cfgs(root, out, **kw):
    cfg = PruneConfig(model=str(root / "model"), task=str(root / "task"), output_dir=str(out),
                      calibration_examples=40, curve_examples=24, stats_batch_size=8, grid_step=1, **kw)
    return cfg, FinetuneConfig(epochs=1, lr=1e-3, batch_size=8, max_length=16, seed=0)


def test_methods_and_budgets_in_kv_heads():
    assert kv_methods(DEFAULT_METHODS) == list(KV_SELECTORS)
    assert kv_methods(["random", "gqa-fisher", "cahp"]) == ["gqa-cahp", "gqa-random", "gqa-fisher"]
    with pytest.raises(ValueError, match="no KV-group method entropy"):
        kv_methods(["random", "entropy"])
    heads_default = CompareConfig().budgets
    assert [(b["label"], b["k"]) for b in kv_budgets(heads_default, 5, 90)] == [
        ("k*", 5), ("1/3 removed", 60), ("2/3 removed", 30)]
    assert [(b["label"], b["k"]) for b in kv_budgets(heads_default, None, 3)] == [("1/3 removed", 2),
                                                                                  ("2/3 removed", 1)]
    assert [(b["label"], b["k"]) for b in kv_budgets([0.5, 0.01], None, 9)] == [("50% kept", 4), ("1% kept", 1)]


def test_compare_on_a_decoder_end_to_end_reuses_the_prune_folder_and_its_own_cache(tiny_lm, tmp_path):
    out = tmp_path / "run"
    cfg, ft = _cfgs(tiny_lm, out)
    run_prune(dataclasses.replace(cfg, skip_final_finetune=True), ft, progress=False)
    ccfg = CompareConfig(methods=["random"], seeds=2, knee=False, n_bootstrap=200)  # heads default budgets
    r = run_compare_decoder(cfg, ft, ccfg, progress=False, timing=TIMING).report
    # the prune run's stages are read, not recomputed
    assert all(v["cached"] for v in r["timings"]["stages"].values()), r["timings"]["stages"]
    for name in ("compare.json", "compare.md", "compare.png", "compare_layers.png", "run.json", "log.txt"):
        assert (out / name).is_file(), name
    assert r["kind"] == "causal-lm" and r["kv_heads"] == 9 and r["heads"] == 18 and not r["partial"]
    assert [(b["label"], b["k"]) for b in r["budgets"]] == [("1/3 removed", 6), ("2/3 removed", 3)]
    assert r["settings"]["methods_run"] == ["gqa-cahp", "gqa-random"]
    dense = r["dense"]
    stages = read_json(out / "stages" / "perplexity_dense.json")
    assert dense["perplexity"] == pytest.approx(stages["perplexity"], rel=1e-6)
    curve = {p["k"]: p for p in read_json(out / "stages" / "curve-gqa-cahp-greedy.json")["points"]}
    for b in r["budgets"]:
        label, k = b["label"], b["k"]
        pre, fine = r["no_finetune"]["results"][label], r["finetuned"]["results"][label]
        # CAHP through gates here is CAHP's curve point of cahp prune at the same k
        assert pre["gqa-cahp"]["perplexity"] == pytest.approx(curve[k]["perplexity"], rel=1e-6)
        assert pre["gqa-cahp"]["seeds"] == [] and pre["gqa-random"]["seeds"] == [0, 1]
        assert sum(pre["gqa-cahp"]["heads_per_layer"]) == 2 * k and 0 <= pre["gqa-cahp"]["mean_relative_depth"] <= 1
        assert "vs_cahp" not in pre["gqa-cahp"] and "vs_cahp" not in fine["gqa-cahp"]
        for part in (pre, fine):
            for s in part.values():
                assert s["kv_heads"] == k and s["kv_cache_bytes_per_token"] * 9 == dense["kv_cache_bytes_per_token"] * k
                assert s["parameters"] < dense["parameters"] and s["perplexity"] > 1
        # no fine-tuning: random's two selections pooled; the diff is the difference of mean NLLs
        v = pre["gqa-random"]["vs_cahp"]
        assert v["pooled"]["diff"] == pytest.approx(pre["gqa-random"]["mean_nll"] - pre["gqa-cahp"]["mean_nll"],
                                                    rel=1e-6)
        assert v["pooled"]["verdict"] in ("win", "tie", "loss") and len(v["per_seed"]) == 2
        assert v["pooled"]["text"].startswith(f"at {label} ({k} KV heads)")
        f = fine["gqa-random"]["vs_cahp"]
        assert [s["seed"] for s in f["per_seed"]] == [0, 1] and sum(f["per_seed_verdicts"].values()) == 2
        assert len(fine["gqa-cahp"]["perplexity_per_seed"]) == 2
        # speed: dense against CAHP's pruned model, interleaved
        sp = r["speed"][label]
        assert sp["k"] == k and set(sp["decode"]) == {"1", "2"}
        for pair in (*sp["decode"].values(), sp["prefill"]):
            assert pair["dense"]["n"] == pair["pruned"]["n"] >= 3 and pair["speedup"] > 0
            assert len(pair["speedup_ci95"]) == 2
        assert sp["decode"]["2"]["dense"]["tokens_per_s"] > 0
    control = r["finetuned"]["dense_control"]
    assert control["kv_heads"] == 9 and set(control["vs_cahp"]) == {"1/3 removed", "2/3 removed"}
    md = (out / "compare.md").read_text()
    assert "## 1/3 removed: 6 of 9 KV heads" in md and "## Speed" in md and "dense control" in md
    per_layer = r["no_finetune"]["results"]["1/3 removed"]["gqa-cahp"]["kv_heads_per_layer"]
    assert f"- gqa-cahp: `{''.join(map(str, per_layer))}` ({per_layer.count(0)} empty" in md
    assert json.loads((out / "compare.json").read_text())["budgets"] == r["budgets"]
    # the benchmark's section of RESULTS.md renders from the JSON alone
    text = bench_decoder.render(json.loads(json.dumps({**r, "meta": metadata()})))
    assert "### 1/3 removed: 6 of 9 KV heads" in text and "### Speed" in text
    assert "1/3 removed (6 of 9 KV heads), after one fine-tuning: CAHP wins" in text
    assert "KV cache 384 of 576 bytes per token (0.667; 6 / 9 = 0.667); decode at batch 2" in text
    assert "- CAHP's allocation of KV heads over layers: greedy (per-layer counts" in text  # the default, auto

    def rendered(prune: dict, cahp: dict) -> str:
        settings = {**r["settings"], "prune": prune, "methods": {**r["settings"]["methods"], "gqa-cahp": cahp}}
        return bench_decoder.render(json.loads(json.dumps({**r, "settings": settings, "meta": metadata()})))

    prune = {k: v for k, v in r["settings"]["prune"].items() if k != "kv_allocation"}
    cahp = {k: v for k, v in r["settings"]["methods"]["gqa-cahp"].items() if k != "allocation"}
    assert "over layers: global (one clustering" in rendered(prune, cahp)  # a file older than the setting
    # a file of the time when auto meant salience: CAHP's recorded settings say which rule ran
    assert "over layers: salience (per-layer counts of the summed-salience ranking, CAHP's clusters" in rendered(
        {**prune, "kv_allocation": "auto"}, {**cahp, "allocation": "salience"})
    # a re-run reads every result from the caches
    again = run_compare_decoder(cfg, ft, ccfg, progress=False, timing=TIMING).report
    assert again["timings"]["results_computed"] == 0 and again["timings"]["results_cached"] > 0
    assert again["finetuned"]["results"] == r["finetuned"]["results"] and again["speed"] == r["speed"]
    # another fine-tuning setting recomputes the fine-tuned results only
    third = run_compare_decoder(cfg, ft, CompareConfig(methods=["random"], seeds=1, knee=False, finetune=False,
                                                       n_bootstrap=200), progress=False, timing=TIMING).report
    assert third["timings"]["results_computed"] == 0 and third["finetuned"] is None


def test_run_compare_dispatches_a_decoder(tiny_lm, tmp_path, monkeypatch):
    seen = {}

    def fake(cfg, ft_cfg, ccfg, progress, timing=None):
        seen.update(cfg=cfg, ft=ft_cfg, ccfg=ccfg, timing=timing)
        return "decoder"

    monkeypatch.setattr(compare_decoder, "run_compare_decoder", fake)
    cfg, ft = _cfgs(tiny_lm, tmp_path / "d")
    assert run_compare(cfg, ft, progress=False) == "decoder"
    assert seen["ft"] is ft and seen["ccfg"].methods == DEFAULT_METHODS and seen["timing"] is None
    assert run_compare(cfg, ft, progress=False, timing=TIMING) == "decoder" and seen["timing"] is TIMING


@pytest.mark.parametrize(("change", "timing", "match"), [
    ({"methods": ["entropy"]}, {}, "no KV-group method entropy"),
    ({"budgets": [1.5]}, {}, r"shares of the KV heads kept, in \(0, 1\]"),
    ({"seeds": 0}, {}, "--seeds must be at least 1"),
    ({"budgets": [], "knee": False}, {}, "no budget"),
    ({}, {"seconds": -1}, "timing seconds must be >= 0"),
    ({}, {"batch_sizes": [8, 0]}, "timing counts must be at least 1, got batch size 0"),
    ({}, {"min_reps": 10, "max_reps": 2}, "max_reps 2 is below min_reps 10"),
])
def test_bad_compare_options_are_refused_before_any_work(tiny_lm, tmp_path, monkeypatch, change, timing, match):
    monkeypatch.setattr(compare_decoder, "prepare_decoder", None)  # any work would fail differently
    cfg, ft = _cfgs(tiny_lm, tmp_path / "bad")
    with pytest.raises(ValueError, match=match):
        run_compare_decoder(cfg, ft, CompareConfig(**change), progress=False, timing=DecodeTimingConfig(**timing))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("prune", "match"), [
    ({"keep": 2}, "--keep and --keep-ratio set cahp prune's budget"),
    ({"ffn": True}, "--ffn applies to encoders"),
    ({"output_dir": ""}, "an output folder is needed"),
])
def test_prune_options_that_do_not_apply_are_refused(tiny_lm, tmp_path, monkeypatch, prune, match):
    monkeypatch.setattr(compare_decoder, "prepare_decoder", None)
    cfg, ft = _cfgs(tiny_lm, tmp_path / "bad", **{k: v for k, v in prune.items() if k != "output_dir"})
    if "output_dir" in prune:
        cfg.output_dir = ""
    with pytest.raises(ValueError, match=match):
        run_compare_decoder(cfg, ft, CompareConfig(), progress=False, timing=TIMING)
    with pytest.raises(ValueError, match="epochs"):
        run_compare_decoder(_cfgs(tiny_lm, tmp_path / "bad")[0], FinetuneConfig(epochs=0), CompareConfig(),
                            progress=False, timing=TIMING)
    assert not (tmp_path / "bad").exists()


def test_benchmark_options_become_the_compare_settings(tmp_path):
    args = bench_decoder.build_parser().parse_args(
        ["smollm2_sst5", "--seeds", "1", "--methods", "random", "fisher", "--epochs", "2", "--calibration-examples",
         "128", "--curve-examples", "64", "--timing-seconds", "5", "--timing-batch-sizes", "1", "8",
         "--output-dir", str(tmp_path / "o")])
    cfg, ft, ccfg, timing = bench_decoder.settings("smollm2_sst5", args)
    assert (cfg.model, cfg.task, cfg.calibration_examples, cfg.curve_examples) == ("smollm2-135m", "sst5", 128, 64)
    assert ft.epochs == 2 and ccfg.seeds == 1 and kv_methods(ccfg.methods) == ["gqa-cahp", "gqa-random", "gqa-fisher"]
    assert ccfg.budgets == CompareConfig().budgets  # the heads default: 2/3 and 1/3 of the KV heads kept
    assert timing.seconds == 5 and timing.batch_sizes == [1, 8] and timing.new_tokens == 32
    assert [s for s, m, _ in make_results.SECTIONS if m == "bench_decoder"][0] == "decoder_smollm2_sst5"


def test_cahp_compare_command_on_a_decoder_prints_the_kv_verdicts(tiny_lm, tmp_path, monkeypatch, capsys):
    from cahp.cli import main

    out = tmp_path / "cli"
    # the command's decode timing, made tiny through its --timing-* options
    timing = ["--timing-seconds", str(TIMING.seconds), "--timing-new-tokens", str(TIMING.new_tokens),
              "--timing-prompt-tokens", str(TIMING.prompt_tokens), "--timing-batch-sizes",
              *map(str, TIMING.batch_sizes), "--timing-prefill-tokens", str(TIMING.prefill_tokens),
              "--timing-min-reps", str(TIMING.min_reps), "--timing-max-reps", str(TIMING.max_reps),
              "--timing-n-bootstrap", str(TIMING.n_bootstrap)]
    argv = ["compare", "--model", str(tiny_lm / "model"), "--task", str(tiny_lm / "task"), "--output-dir", str(out),
            "--calibration-examples", "40", "--curve-examples", "24", "--stats-batch-size", "8", "--grid-step", "1",
            "--epochs", "1", "--lr", "1e-3", "--batch-size", "8", "--max-length", "16", "--methods", "magnitude",
            "--seeds", "1", "--no-knee", "--no-finetune", "--n-bootstrap", "100", *timing]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gqa-magnitude, without fine-tuning, at 1/3 removed (6 KV heads)" in printed
    assert " of 9 KV heads; budgets" in printed  # the budget unit of a decoder: KV heads, not query heads
    r = json.loads((out / "compare.json").read_text())
    assert r["settings"]["methods_run"] == ["gqa-cahp", "gqa-magnitude"] and r["speed"]["2/3 removed"]["k"] == 3
    assert r["settings"]["timing"] == dataclasses.asdict(TIMING)  # every --timing-* option reached the timing
