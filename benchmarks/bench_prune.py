"""`cahp prune` end to end with defaults on minilm-l6 / SST-5 (issues 4 and 19).

    python benchmarks/bench_prune.py                      # defaults, as `cahp prune --model minilm-l6 --task sst5`
    python benchmarks/bench_prune.py --output-dir DIR     # another output folder
    python benchmarks/bench_prune.py --ffn                # as `cahp prune ... --ffn`: heads + neurons, knee
    python benchmarks/bench_prune.py --ffn --target-speedup 2   # ... a speed target instead of the knee

Runs the library's pipeline exactly as the CLI does and writes the report's key
figures to results/prune_minilm_sst5.json (heads only; it also copies the run's
curve and kept-heads figures to docs/images/ for the README), or with --ffn to
results/prune_ffn_minilm_sst5.json (prune_ffn_2x_... with --target-speedup 2):
kept heads and neurons per layer, estimated and measured speedups of the saved
pruned model, accuracies and the seconds of every stage (issue 19's cost goal:
the whole run within 30 minutes on this 2-core CPU). --ffn runs in
runs/bench/prune-minilm-l6-sst5 as bench_frontier does, so they share the dense
model and statistics.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, meta_lines, metadata, write_result  # noqa: E402
from cahp.pipelines.prune import PruneConfig, run_prune  # noqa: E402
from cahp.train.finetune import FinetuneConfig  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=str(REPO / "runs" / "bench" / "prune-minilm-l6-sst5"))
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--task", default="sst5")
    p.add_argument("--ffn", action="store_true", help="heads and FFN neurons together (`cahp prune --ffn`)")
    p.add_argument("--target-speedup", type=float, default=0.0, help="with --ffn: this estimated speedup, not the knee")
    args = p.parse_args()
    if args.target_speedup and not args.ffn:
        p.error("--target-speedup needs --ffn")
    meta = metadata()
    cfg = PruneConfig(model=args.model, task=args.task, output_dir=args.output_dir, ffn=args.ffn,
                      target_speedup=args.target_speedup)
    res = run_prune(cfg, FinetuneConfig(seed=cfg.seed))
    r = res.report
    if args.ffn:
        target = f"_{args.target_speedup:g}x" if args.target_speedup else ""
        write_result(f"prune_ffn{target}_{args.model.split('-')[0]}_{args.task}", {k: r[k] for k in FFN_KEYS}, meta)
        return
    images = REPO / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in ("curve.png", "heads.png", "distances.png"):
        shutil.copy(res.output_dir / name, images / f"prune-{args.model}-{args.task}-{name}")
    keep = ("model", "task", "settings", "data", "heads_before", "k_star", "heads_kept", "k_source", "knee",
            "curve", "kept_heads", "heads_per_layer", "mean_relative_depth", "scores", "parameters",
            "stage_seconds", "total_seconds")
    write_result(f"prune_{args.model.split('-')[0]}_{args.task}", {k: r[k] for k in keep}, meta)


FFN_KEYS = ("model", "task", "settings", "data", "ffn", "heads_before", "neurons_before", "share_star", "k_source",
            "target_speedup", "heads_kept", "neurons_kept", "head_weight", "knee", "curve", "heads_per_layer",
            "neurons_per_layer", "estimated_share", "estimated_speedup", "measured_speedup", "parameters", "scores",
            "stage_seconds", "total_seconds")


def render_ffn(result: dict) -> str:
    """The `--ffn` run: what was kept, estimated and measured speedups, accuracies, stage seconds."""
    s, split = result["scores"], result["data"]["test_split"]
    how = (f"the target speedup {result['target_speedup']:g}x" if result["target_speedup"]
           else f"the knee of the curve ({result['k_source']})")
    out = [meta_lines(result["meta"]),
           f"Chosen by {how}: **{result['heads_kept']}** of {result['heads_before']} heads and "
           f"**{result['neurons_kept']:,}** of {result['neurons_before']:,} FFN neurons (head weight "
           f"{result['head_weight']:g}); heads per layer {result['heads_per_layer']}, neurons per layer "
           f"{result['neurons_per_layer']}; estimated share of dense latency {result['estimated_share']:.3f}; "
           f"parameters {result['parameters']['before']:,} -> {result['parameters']['after']:,}.\n",
           "| shape | estimated speedup | measured speedup (saved pruned model, 1 thread) | 95% CI |",
           "|---|---|---|---|"]
    for shape, est in result["estimated_speedup"].items():
        m = (result["measured_speedup"] or {}).get(shape)
        out.append(f"| {shape} | {est:.2f}x | " + (f"{m['speedup']:.2f}x | [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}] |"
                                                   if m else "- | - |"))
    out += ["", f"| model | {split} accuracy | 95% CI |", "|---|---|---|"]
    for label, key in (("dense, fine-tuned", "before_pruning"), ("pruned, no fine-tuning", "after_pruning"),
                       ("pruned, fine-tuned once", "after_finetune")):
        if s.get(key):
            r = s[key][split]
            out.append(f"| {label} | {r['accuracy'] * 100:.2f} | [{r['accuracy_ci95'][0] * 100:.1f}, "
                       f"{r['accuracy_ci95'][1] * 100:.1f}] |")
    out += ["", "| stage | seconds |", "|---|---|"]
    for stage, t in result["stage_seconds"].items():
        out.append(f"| {stage} | {t['seconds']:.0f}{' (cached)' if t['cached'] else ''} |")
    total = result["total_seconds"]
    cached = any(t["cached"] for t in result["stage_seconds"].values())
    out.append(f"| **total** | {total:.0f} |")
    out.append(f"\nThe whole run took {total / 60:.1f} minutes"
               + (" (some stages read from the cache: not a measure of the full cost)" if cached else
                  f" (goal at most 30 minutes on this 2-core CPU: {'met' if total <= 1800 else 'not met'})") + ".\n")
    return "\n".join(out)


def render(result: dict) -> str:
    if result.get("ffn"):
        return render_ffn(result)
    s = result["scores"]
    split = result["data"]["test_split"]
    rows = [("dense, fine-tuned", s["before_pruning"]), ("pruned to k*, no fine-tuning", s["after_pruning"]),
            ("pruned, fine-tuned once", s["after_finetune"])]
    out = [meta_lines(result["meta"]),
           f"k* = **{result['k_star']}** of {result['heads_before']} heads ({result['k_source']}; knee rule "
           f"`{result['knee']['method']}`, polynomial degree {result['knee']['degree']}"
           + (f", fallback {result['knee']['fallback']}" if result["knee"].get("fallback") else "") + "); "
           f"heads per layer {result['heads_per_layer']}, mean relative depth "
           f"{result['mean_relative_depth']:.2f}; parameters {result['parameters']['before']:,} -> "
           f"{result['parameters']['after']:,}.\n",
           f"| model | {split} accuracy | 95% CI | macro-F1 |", "|---|---|---|---|"]
    for label, sc in rows:
        if sc:
            r = sc[split]
            out.append(f"| {label} | {r['accuracy'] * 100:.2f} | [{r['accuracy_ci95'][0] * 100:.1f}, "
                       f"{r['accuracy_ci95'][1] * 100:.1f}] | {r['macro_f1'] * 100:.2f} |")
    out += ["", "| stage | seconds |", "|---|---|"]
    for stage, t in result["stage_seconds"].items():
        out.append(f"| {stage} | {t['seconds']:.0f}{' (cached)' if t['cached'] else ''} |")
    out.append(f"| **total** | {result['total_seconds']:.0f} |")
    out.append("\nCurve (held-out training examples, accuracy through gates): "
               + ", ".join(f"{p['k']}: {p['accuracy'] * 100:.1f}" for p in result["curve"]) + "\n")
    return "\n".join(out)


if __name__ == "__main__":
    main()
