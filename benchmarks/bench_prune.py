"""`cahp prune` end to end with defaults on minilm-l6 / SST-5 (issue 4).

    python benchmarks/bench_prune.py                      # defaults, as `cahp prune --model minilm-l6 --task sst5`
    python benchmarks/bench_prune.py --output-dir DIR     # another output folder

Runs the library's pipeline exactly as the CLI does, copies the run's curve and
kept-heads figures to docs/images/ for the README, and writes the report's key
figures to results/prune_minilm_sst5.json.
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
    args = p.parse_args()
    meta = metadata()
    cfg = PruneConfig(model=args.model, task=args.task, output_dir=args.output_dir)
    res = run_prune(cfg, FinetuneConfig(seed=cfg.seed))
    r = res.report
    images = REPO / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in ("curve.png", "heads.png", "distances.png"):
        shutil.copy(res.output_dir / name, images / f"prune-{args.model}-{args.task}-{name}")
    keep = ("model", "task", "settings", "data", "heads_before", "k_star", "heads_kept", "k_source", "knee",
            "curve", "kept_heads", "heads_per_layer", "mean_relative_depth", "scores", "parameters",
            "stage_seconds", "total_seconds")
    write_result(f"prune_{args.model.split('-')[0]}_{args.task}", {k: r[k] for k in keep}, meta)


def render(result: dict) -> str:
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
