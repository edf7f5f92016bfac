"""Render RESULTS.md from benchmarks/results/*.json (never from typed numbers).

Each benchmark module ``benchmarks.<name>`` whose results file exists
provides ``render(result: dict) -> str`` (markdown). Sections appear in
`SECTIONS` order.

    python benchmarks/make_results.py
"""

from __future__ import annotations

import importlib
import json
import sys
from fnmatch import fnmatch
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))

# (results file stem, benchmark module, section title)
SECTIONS = [
    ("finetune_dense", "bench_finetune", "Dense fine-tuning (issue 3)"),
    ("finetune_speed", "bench_finetune", "Fine-tuning speed: data handling against bare forward+backward (issue 3)"),
    ("prune_minilm_sst5", "bench_prune", "CAHP end to end: `cahp prune` on minilm-l6 / SST-5 (issue 4)"),
    ("signature_cost", "bench_signatures", "Signature and distance cost, memory (issue 4)"),
    ("neuron_stats_cost", "bench_neuron_stats", "Neuron statistics and joint selection cost, memory (issue 19)"),
    ("latency*", "bench_latency", "Latency goals of issue 6: every measurement of each cell"),
    ("latency", "bench_latency", "Latency of pruned models (issue 6)"),
    ("latency_1x32", "bench_latency", "Latency at batch 1 x 32 tokens, more repetitions (issue 6)"),
    ("latency_32x128", "bench_latency", "Latency at batch 32 x 128 tokens, more repetitions (issue 6)"),
    ("latency_32x128_minilm", "bench_latency",
     "Latency at batch 32 x 128 tokens, minilm-l6, PyTorch only, many repetitions (issue 6)"),
    ("latency_32x128_minilm_long", "bench_latency",
     "Latency at batch 32 x 128 tokens, minilm-l6, PyTorch only, 50 minutes of repetitions, output projection "
     "with bias and residual in its GEMM (issue 6)"),
    ("latency_32x128_mpnet", "bench_latency",
     "Latency at batch 32 x 128 tokens, mpnet-base 50%, PyTorch only, many repetitions on a noisy day (issue 6)"),
    ("latency_32x128_mpnet_long", "bench_latency",
     "Latency at batch 32 x 128 tokens, mpnet-base 50%, PyTorch only, 50 minutes of repetitions (issue 6)"),
    ("latency_32x128_onnx", "bench_latency",
     "ONNX against PyTorch at batch 32 x 128 tokens, both runtimes interleaved call by call (issue 6)"),
    ("latency_32x128_onnx_minilm", "bench_latency",
     "ONNX against PyTorch at batch 32 x 128 tokens, minilm-l6, 45 minutes of interleaved repetitions, output "
     "projection with bias and residual in its GEMM (issue 6)"),
    ("latency_32x128_onnx_mpnet", "bench_latency",
     "ONNX against PyTorch at batch 32 x 128 tokens, mpnet-base, 50 minutes of interleaved repetitions, output "
     "projection with bias and residual in its GEMM (issue 6)"),
    ("latency_sweep", "bench_latency",
     "Where the line is lost: one attention block's cost against its head count (issue 6)"),
    ("latency_sweep_32x128", "bench_latency",
     "Where the line is lost at batch 32 x 128 tokens: minilm-l6's attention block against its head count (issue 6)"),
    ("latency_2threads", "bench_latency",
     "Latency of pruned models with 2 threads on this 2-vCPU machine: too noisy to judge (issue 6)"),
    ("compare_*", "bench_compare", "CAHP against the baselines: overview (issue 7)"),
    ("compare_minilm_sst5", "bench_compare",
     "CAHP against the baselines: minilm-l6 / SST-5, right after pruning (issue 7)"),
    ("compare_minilm_sst5_finetuned", "bench_compare",
     "CAHP against the baselines: minilm-l6 / SST-5, after one fine-tuning (issue 7)"),
    ("compare_minilm_mnli_small", "bench_compare",
     "CAHP against the baselines: minilm-l6 / mnli-small, right after pruning (issue 7)"),
    ("compare_minilm_mnli_small_finetuned", "bench_compare",
     "CAHP against the baselines: minilm-l6 / mnli-small, after one fine-tuning (issue 7)"),
    ("compare_mpnet_sst5", "bench_compare",
     "CAHP against the baselines: mpnet-base / SST-5, right after pruning (issue 7)"),
    ("compare_mpnet_sst5_finetuned", "bench_compare",
     "CAHP against the baselines: mpnet-base / SST-5, after one fine-tuning (issue 7)"),
    ("frontier_minilm_sst5", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / SST-5 (issue 19)"),
    ("frontier_minilm_sst5_2seeds", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / SST-5, 2 seeds, CAHP against Fisher and gradient "
     "(issue 19)"),
    ("frontier_minilm_sst5_3seeds", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / SST-5, 3 seeds, CAHP against Fisher, P-pruning and "
     "gradient (issue 19)"),
    ("frontier_minilm_mnli_small", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / mnli-small (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / mnli-small, 3 seeds, CAHP against every "
     "baseline (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_speeds", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / mnli-small, 3 seeds, 1.5x and 3x, CAHP against "
     "Fisher (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_loss", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / mnli-small, 3 seeds, CAHP's split chosen by held-out "
     "loss, at its knee, 1.5x, 2x and 3x, against Fisher (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_3x_field", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / mnli-small, 3 seeds, 3x, CAHP (loss rule) against "
     "every baseline (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_greedy", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / mnli-small, 3 seeds, CAHP keeping a layer's units "
     "by redundancy-discounted salience (greedy) at 1.5x, 2x and 3x, against Fisher (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_3x_field_greedy", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / mnli-small, 3 seeds, 3x, CAHP (greedy within-layer "
     "rule) against every baseline (issue 19)"),
    ("frontier_minilm_sst5_3seeds_greedy", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / SST-5, 3 seeds, 2x, CAHP (greedy within-layer rule) "
     "against Fisher, P-pruning and gradient (issue 19)"),
    ("prune_ffn_minilm_sst5", "bench_prune",
     "Heads + FFN neurons end to end: the automatic `cahp prune --ffn` on minilm-l6 / SST-5, knee on estimated "
     "latency, measured speedup of the saved model, cost of the run (issue 19)"),
    ("within_layer_minilm_sst5", "bench_within_layer",
     "Which units a layer keeps: cluster representatives, the greedy rule and the most salient units at the same "
     "per-layer counts, minilm-l6 / SST-5 (issue 19)"),
    ("within_layer_minilm_mnli_small", "bench_within_layer",
     "Which units a layer keeps: cluster representatives, the greedy rule and the most salient units at the same "
     "per-layer counts, minilm-l6 / mnli-small (issue 19)"),
    ("frontier_minilm_sst5_3seeds_3x", "bench_frontier",
     "Heads + FFN neurons at equal estimated speed: minilm-l6 / SST-5, 3 seeds, 3x, CAHP (greedy within-layer rule) "
     "against Fisher, P-pruning and gradient (issue 19)"),
    ("frontier_minilm_sst5_3seeds_3x_weight1", "bench_frontier",
     "Heads + FFN neurons at 3x, minilm-l6 / SST-5, 3 seeds: CAHP with its head weight fixed at 1 (a diagnosis of "
     "its split choice; the baselines and the dense control are the 3x run's, from the cache) (issue 19)"),
    ("frontier_minilm_sst5_3seeds_3x_weight2", "bench_frontier",
     "Heads + FFN neurons at 3x, minilm-l6 / SST-5, 3 seeds: CAHP with its head weight fixed at 2 (a diagnosis of "
     "its split choice; the baselines and the dense control are the 3x run's, from the cache) (issue 19)"),
    ("frontier_minilm_sst5_3seeds_3x_collapsed", "bench_frontier",
     "Heads + FFN neurons at 3x, minilm-l6 / SST-5, 3 seeds: CAHP with the rule for collapsed splits (every "
     "split's held-out loss at or above the constant predictor's: the neutral weight 1); the baselines and the "
     "dense control from the cache of the 3x run (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_3x_collapsed", "bench_frontier",
     "Heads + FFN neurons at 3x, minilm-l6 / mnli-small, 3 seeds: CAHP with the rule for collapsed splits (every "
     "split's held-out loss at or above the constant predictor's: the neutral weight 1) against every baseline, "
     "all re-run (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_3x_fidelity", "bench_frontier",
     "Heads + FFN neurons at 3x, minilm-l6 / mnli-small, 3 seeds: CAHP with the fidelity rule for collapsed splits "
     "(every split's held-out loss at or above the constant predictor's: the split whose last hidden states are "
     "closest to the dense model's); the baselines and the dense control from the cache of the collapsed run "
     "(issue 19)"),
    ("frontier_minilm_sst5_3seeds_3x_all", "bench_frontier",
     "Heads + FFN neurons at 3x, minilm-l6 / SST-5, 3 seeds: CAHP with the fidelity rule for collapsed splits "
     "against Fisher, gradient, P-pruning, random and layer drop (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_2x_field", "bench_frontier",
     "Heads + FFN neurons at 2x, minilm-l6 / mnli-small, 3 seeds: CAHP against Fisher, gradient, P-pruning, random "
     "and layer drop, the fidelity rule for collapsed splits (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_2.1x", "bench_frontier",
     "Heads + FFN neurons at an estimated 2.1x, minilm-l6 / mnli-small, 3 seeds: CAHP aimed above 2x for the 1x32 "
     "shape, against the dense control (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_2x_each", "bench_frontier",
     "Heads + FFN neurons at 2x at every shape (--speedup-at each), minilm-l6 / mnli-small, 3 seeds: CAHP against "
     "the dense control (issue 19, the speed-at-accuracy goal)"),
    ("frontier_minilm_mnli_small_3seeds_2x_tuned", "bench_frontier",
     "Heads + FFN neurons at 2x, minilm-l6 / mnli-small, 3 seeds: CAHP against Kwon et al.'s Fisher search with and "
     "without their mask tuning (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_3x_tuned", "bench_frontier",
     "Heads + FFN neurons at 3x, minilm-l6 / mnli-small, 3 seeds: CAHP against Kwon et al.'s Fisher search with and "
     "without their mask tuning (issue 19)"),
    ("frontier_minilm_sst5_3seeds_tuned", "bench_frontier",
     "Heads + FFN neurons at 2x and 3x, minilm-l6 / SST-5, 3 seeds: CAHP against Kwon et al.'s Fisher search with "
     "and without their mask tuning (issue 19)"),
    ("frontier_minilm_sst5_3seeds_2x_field", "bench_frontier",
     "Heads + FFN neurons at 2x, minilm-l6 / SST-5, 3 seeds: CAHP against Fisher, gradient, P-pruning, random and "
     "layer drop (issue 19)"),
    ("frontier_minilm_sst5_3seeds_1.5x_all", "bench_frontier",
     "Heads + FFN neurons at 1.5x, minilm-l6 / SST-5, 3 seeds: CAHP against Fisher, gradient, P-pruning, random "
     "and layer drop (issue 19)"),
    ("frontier_minilm_mnli_small_3seeds_1.5x_all", "bench_frontier",
     "Heads + FFN neurons at 1.5x, minilm-l6 / mnli-small, 3 seeds: CAHP against Fisher, gradient, P-pruning, "
     "random and layer drop (issue 19)"),
    ("frontier_mpnet_sst5_2x", "bench_frontier",
     "Heads + FFN neurons at 2x: mpnet-base / SST-5, 1 seed: CAHP against Fisher and heads-only CAHP (issue 19)"),
    ("decoder_smollm2_sst5", "bench_decoder",
     "Generative decoder: SmolLM2-135M on SST-5 text, CAHP over KV groups against the baselines, KV cache and decode "
     "speed (issue 23)"),
    ("decoder_smollm2_sst5_salience", "bench_decoder",
     "Generative decoder: SmolLM2-135M on SST-5 text, CAHP with the salience allocation of KV heads over layers "
     "(`--kv-allocation salience`) against gradient and Fisher (issue 23)"),
    ("decoder_smollm2_sst5_greedy", "bench_decoder",
     "Generative decoder: SmolLM2-135M on SST-5 text, CAHP with the greedy allocation of KV heads (salience counts "
     "per layer, redundancy-discounted salience within a layer; `--kv-allocation greedy`) against gradient and "
     "Fisher (issue 23)"),
    ("decoder_smollm2_mnli_small", "bench_decoder",
     "Generative decoder: SmolLM2-135M on mnli-small text, CAHP over KV groups against the baselines, KV cache and "
     "decode speed (issue 23)"),
    ("embedding_minilm_stsb", "bench_embedding",
     "Embedding model without labels: minilm-l6 distilled on SST-5 + mnli-small sentences, zero-shot on STS-B test, "
     "CAHP against the baselines and measured throughput (issue 22)"),
    ("embedding_mpnet_stsb", "bench_embedding",
     "Embedding model without labels: mpnet-base distilled on SST-5 + mnli-small sentences, zero-shot on STS-B test, "
     "CAHP against the baselines and measured throughput (issue 22)"),
    ("embedding_minilm_stsb_ffn", "bench_embedding",
     "Embedding model without labels, heads + FFN neurons: the automatic `cahp prune --objective embedding --ffn` "
     "run of minilm-l6, zero-shot on STS-B test, measured throughput and latency (issue 22)"),
    ("embedding_minilm_stsb_ffn_2x", "bench_embedding",
     "Embedding model without labels, heads + FFN neurons at a 2x target: `cahp prune --objective embedding --ffn "
     "--target-speedup 2` of minilm-l6, zero-shot on STS-B test, measured throughput and latency (issue 22)"),
    ("embedding_minilm_stsb_ffn_2x_3epochs", "bench_embedding",
     "Embedding model without labels, heads + FFN neurons at a 2x target, 3 epochs of distillation on every text: "
     "minilm-l6, zero-shot on STS-B test, measured throughput and latency (issue 22)"),
    ("embedding_mpnet_stsb_ffn", "bench_embedding",
     "Embedding model without labels, heads + FFN neurons: the automatic `cahp prune --objective embedding --ffn` "
     "run of mpnet-base, zero-shot on STS-B test, measured throughput and latency (issue 22)"),
    ("distributed", "bench_distributed", "One process against torchrun (issue 5)"),
    ("deploy_minilm_sst5", "bench_deploy",
     "Deployment: minilm-l6 / SST-5 pruned, in PyTorch, ONNX and int8 ONNX against dense PyTorch (issue 20)"),
]


def main() -> None:
    out = [
        "# Results\n",
        "Generated by `python benchmarks/make_results.py` from `benchmarks/results/*.json`; "
        "each section names the command, date, machine and git revision that produced it. "
        "Do not edit by hand.\n",
    ]
    for stem, module_name, title in SECTIONS:
        # a stem with "*" is an overview: the module's render_overview gets every matching file, in
        # SECTIONS order
        paths = [HERE / "results" / f"{s}.json" for s, _, _ in SECTIONS if "*" not in s and fnmatch(s, stem)]
        paths = [p for p in paths if p.is_file()]
        if not paths:
            continue
        module = _load(module_name)
        out.append(f"\n## {title}\n")
        if "*" in stem:
            out.append(module.render_overview({p.stem: json.loads(p.read_text()) for p in paths}))
        else:
            out.append(module.render(json.loads(paths[0].read_text())))
    (HERE.parent / "RESULTS.md").write_text("\n".join(out).rstrip() + "\n")
    print(f"wrote {HERE.parent / 'RESULTS.md'}")
    update_readme()


def update_readme() -> None:
    """Fill the README's marked results sections (``<!-- results:NAME:start -->`` ... ``end``) from results files."""
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    for name, make in README_SECTIONS:
        start, end = f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
        body = make() if start in text else None
        if body is None:
            continue
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + start + "\n".join(body) + end + after
    readme.write_text(text)
    print(f"updated {readme}")


def _load(module_name: str):
    """The benchmark module ``benchmarks.<module_name>`` (each renders its own results)."""
    return importlib.import_module(f"benchmarks.{module_name}")


def _compare_section() -> list[str] | None:
    """CAHP's win / tie / loss counts against each baseline, over every compare result, per part."""
    stems = [s for s, _, _ in SECTIONS if s.startswith("compare_") and "*" not in s]
    results = {s: json.loads(p.read_text()) for s in stems if (p := HERE / "results" / f"{s}.json").is_file()}
    if not results:
        return None
    bench = _load("bench_compare")
    parts = ("right after pruning", "after one fine-tuning")
    totals = {part: bench.verdict_totals(results, part) for part in parts}
    rows, _ = bench.overview_rows(results)
    n = {part: sum(1 for row in rows if row[0] == part) for part in parts}
    runs = sorted({f"{r['model']} / {r['task']}" for r in results.values()})
    lines = [
        "",
        f"CAHP's verdict against each baseline at the same head budget, over {', '.join(runs)}: "
        "win / tie / loss, where a tie means the 95% paired-bootstrap interval of (baseline - CAHP) on the "
        "test examples contains 0.",
        "",
        "| baseline | " + " | ".join(f"{part} ({n[part]} comparisons)" for part in parts) + " |",
        "|---|" + "---|" * len(parts),
    ]
    for m in totals[parts[0]]:
        lines.append(f"| {m} | " + " | ".join(
            "{win} / {tie} / {loss}".format(**totals[part][m]) if m in totals[part] else "–" for part in parts) + " |")
    seeds = [f"{r['model']} / {r['task']}: {len(r['settings']['seeds'])}"
             for r in results.values() if r.get("finetuned")]
    lines += ["", "Seeds of the fine-tuned comparisons: " + "; ".join(seeds) + " (with one seed the interval covers "
              "the sampling of test examples only, not the spread between fine-tuning runs)."]
    lines += ["", "Generated by `benchmarks/make_results.py` from `benchmarks/results/compare_*.json`; every "
              "comparison, its budget, seeds, intervals and provenance are in [RESULTS.md](RESULTS.md).", ""]
    return lines


def _prune_result(stem: str) -> tuple[dict, str, dict] | None:
    """(result, test split, accuracies in % by stage) of a `bench_prune` results file; None if it is missing."""
    path = HERE / "results" / f"{stem}.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    split = r["data"]["test_split"]
    sc = r["scores"]
    acc = {k: sc[k][split]["accuracy"] * 100 for k in ("before_pruning", "after_pruning", "after_finetune") if sc[k]}
    return r, split, acc


def _accuracy_line(split: str, acc: dict) -> str:
    return (f"- SST-5 {split} accuracy: dense fine-tuned {acc['before_pruning']:.2f}, "
            f"pruned {acc['after_pruning']:.2f}, "
            + (f"pruned and fine-tuned once {acc['after_finetune']:.2f}" if "after_finetune" in acc
               else "not fine-tuned"))


def _prune_ffn_section() -> list[str] | None:
    """The automatic `cahp prune --ffn` run: kept units, estimated and measured speedups, accuracy, wall time."""
    if (found := _prune_result("prune_ffn_minilm_sst5")) is None:
        return None
    r, split, acc = found
    measured = r["measured_speedup"] or {}
    return [
        "",
        f"### With `--ffn`: `cahp prune --model minilm-l6 --task sst5 --ffn` (from `{r['meta']['date'][:10]}`, "
        f"revision {r['meta']['git_revision']}, {r['meta']['machine']['cores']} CPU cores)",
        "",
        f"- the knee keeps **{r['heads_kept']}** of {r['heads_before']} heads and **{r['neurons_kept']:,}** of "
        f"{r['neurons_before']:,} FFN neurons, per layer {r['heads_per_layer']} / {r['neurons_per_layer']}",
        "- speedup of the saved model, 1 thread: "
        + ", ".join(f"{shape} estimated {est:.2f}x, measured "
                    + (f"{measured[shape]['speedup']:.2f}x [{measured[shape]['ci95'][0]:.2f}, "
                       f"{measured[shape]['ci95'][1]:.2f}]" if shape in measured else "-")
                    for shape, est in r["estimated_speedup"].items()),
        _accuracy_line(split, acc),
        f"- wall time {r['total_seconds'] / 60:.0f} min (one seed; the 2x target against the baselines and a "
        "3-seed dense control: the `cahp compare --ffn` table below)",
        "",
        "Generated by `benchmarks/make_results.py` from `benchmarks/results/prune_ffn_minilm_sst5.json`.",
        "",
    ]


def _prune_section() -> list[str] | None:
    """The end-to-end prune benchmark: k*, parameters, accuracy, wall time."""
    if (found := _prune_result("prune_minilm_sst5")) is None:
        return None
    r, split, acc = found
    total_min = r["total_seconds"] / 60
    return [
        "",
        f"### A real run: `cahp prune --model minilm-l6 --task sst5` (from `{r['meta']['date'][:10]}`, "
        f"revision {r['meta']['git_revision']}, {r['meta']['machine']['cores']} CPU cores)",
        "",
        f"- k* = **{r['k_star']}** of {r['heads_before']} heads ({r['k_source']}), kept per layer "
        f"{r['heads_per_layer']}, mean relative depth {r['mean_relative_depth']:.2f}",
        f"- parameters {r['parameters']['before']:,} -> {r['parameters']['after']:,}",
        _accuracy_line(split, acc),
        f"- wall time {total_min:.0f} min: "
        + ", ".join(f"{k} {v['seconds'] / 60:.1f}" for k, v in r["stage_seconds"].items()),
        "",
        "![curve](docs/images/prune-minilm-l6-sst5-curve.png) ![heads](docs/images/prune-minilm-l6-sst5-heads.png)",
        "",
        "Generated by `benchmarks/make_results.py` from `benchmarks/results/prune_minilm_sst5.json`.",
        "",
    ]


def _frontier_section() -> list[str] | None:
    """Heads + FFN neurons (`cahp compare --ffn`): CAHP's measured speed and accuracy per target, its verdicts."""
    from cahp.pipelines import report_ffn

    stems = [s for s, _, _ in SECTIONS if s.startswith("frontier_")]
    results = {s: json.loads(p.read_text()) for s in stems if (p := HERE / "results" / f"{s}.json").is_file()}
    if not results:
        return None
    lines = ["", "| comparison | CAHP's split by | CAHP's units by | target | CAHP: measured speedup | CAHP | dense "
             "control | CAHP wins / ties / loses against |", "|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        n = len(r["settings"]["seeds"])
        fixed = report_ffn.fixed_weight(r)
        split_by = (f"head weight {fixed}, fixed" if fixed
                    else "held-out " + ("loss" if report_ffn.split_by(r) == "loss" else "accuracy"))
        if not fixed and report_ffn.neutral_fallback(r):
            split_by += ", weight 1 where all at chance"
        elif not fixed and report_ffn.fidelity_fallback(r):
            split_by += ", closest hidden states where all at chance"
        elif not fixed and report_ffn.heads_fallback(r):
            split_by += ", most heads where all at chance"
        units_by = report_ffn.within(r)
        control = (r["dense"].get("control") or {}).get("accuracy")
        for t in r["targets"]:
            rows = r["results"][t["label"]]
            cahp = rows.get("cahp", {})
            if "finetuned" not in cahp:
                continue
            speed = ", ".join(f"{s} {v['speedup']:.2f}x [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
                              for s, v in (cahp.get("measured_speedup") or {}).items())
            verdicts = {"win": [], "tie": [], "loss": []}
            for m, row in rows.items():
                if (v := ((row.get("finetuned") or {}).get("vs_cahp") or {}).get("pooled")) is not None:
                    verdicts[v["verdict"]].append(m)
            lines.append(f"| {r['model']} / {r['task']}, {n} seed{'s' if n > 1 else ''} | {split_by} | {units_by} "
                         f"| {t['label']}{' at each shape' if t.get('at') == 'each' else ''} "
                         f"| {speed} | "
                         f"{cahp['finetuned']['accuracy'] * 100:.2f} | "
                         + (f"{control * 100:.2f}" if control is not None else "-") + " | "
                         + " / ".join(", ".join(v) or "none" for v in verdicts.values()) + " |")
    lines += ["", "Test accuracy (%) after the same single fine-tuning for every method; speedups dense / pruned "
              "latency, 1 thread, 95% intervals. CAHP's split by: what chose its head weight (the split of the "
              "budget between heads and neurons) at each share; held-out accuracy ties at chance when pruned hard, "
              "the loss orders the candidates then but, at 3x, by margins too small to mean anything (RESULTS.md, "
              "the SST-5 3x section); CAHP's units by: how it kept a layer's units, cluster representatives or "
              "salience discounted by nearness to the units kept before (greedy), see docs/METHOD.md. Generated by "
              "`benchmarks/make_results.py` from "
              "`benchmarks/results/frontier_*.json`; tables, figures and provenance in [RESULTS.md](RESULTS.md).", ""]
    return lines


# README sections filled by update_readme: marker name -> lines (None: its results file is missing)
README_SECTIONS = (("prune", _prune_section), ("prune_ffn", _prune_ffn_section), ("compare", _compare_section),
                   ("frontier", _frontier_section))


if __name__ == "__main__":
    main()
