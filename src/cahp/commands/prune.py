"""``cahp prune``: the CAHP pipeline end to end (see cahp.pipelines.prune)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from cahp.commands._common import prune_configs
from cahp.core.configs import add_dataclass_args, from_args
from cahp.pipelines.joint_config import JointConfig
from cahp.pipelines.stages import PruneConfig
from cahp.train.finetune import FinetuneConfig

log = logging.getLogger("cahp.prune")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, PruneConfig)
    g = p.add_argument_group("fine-tuning (the first one, if needed, and the single one after pruning)")
    add_dataclass_args(g, FinetuneConfig, skip=("seed",))
    j = p.add_argument_group("heads and FFN neurons (--ffn)")
    add_dataclass_args(j, JointConfig)


def run(args) -> int:
    from cahp.core import distributed
    from cahp.pipelines.card import write_model_card
    from cahp.pipelines.prune import run_prune

    cfg, ft = prune_configs(args)
    result = run_prune(cfg, ft, joint=from_args(JointConfig, args))
    if not distributed.is_main():  # under torchrun rank 0 reports
        return 0
    r = result.report
    if r.get("objective", "task") != "task":  # the label-free embedding pipeline's report
        from cahp.pipelines.embedding import summary

        # --ffn also writes structure.png (cahp.pipelines.joint_report.write_outputs)
        figures = ("curve.png, heads.png, structure.png, distances.png" if r.get("ffn")
                   else "curve.png, heads.png, distances.png")
        print(f"{summary(r)}\noutputs in {result.output_dir}: model/ (a sentence-transformers folder), report.json, "
              f"{figures}, log.txt")
        return 0
    if r.get("kind") == "causal-lm":  # a generative decoder: KV heads and perplexity (cahp.pipelines.decoder)
        from cahp.pipelines.decoder import summary

        print(f"{summary(r)}\noutputs in {result.output_dir}: model/, report.json, curve.png, heads.png, log.txt")
        return 0
    card = write_model_card(result.output_dir / "model", {**r, "command": shlex.join(["cahp", *sys.argv[1:]])})
    split = r["data"]["test_split"]
    after = r["scores"]["after_finetune"] or r["scores"]["after_pruning"]
    before = r["scores"]["before_pruning"][split]
    # the run's metric first; a regression task also shows Spearman (its second official metric)
    names = [r.get("metric", "accuracy")]
    names += ["spearman"] if "spearman" in before and names[0] != "spearman" else []
    scores = "; ".join(f"{split} {m} {before[m]:.4f} -> {after[split][m]:.4f}" for m in names)
    print(
        f"{r['model']} / {r['task']}: kept {r['heads_kept']} of {r['heads_before']} heads (k* = {r['k_star']}), "
        f"parameters {r['parameters']['before']:,} -> {r['parameters']['after']:,}; {scores}\n"
        f"outputs in {result.output_dir}: model/ (with its model card {card.name}), report.json, curve.png, "
        "heads.png, distances.png, log.txt"
    )
    if r.get("ffn"):  # cahp prune --ffn: neurons and speedups too (cahp.pipelines.joint_report)
        measured = ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in (r["measured_speedup"] or {}).items()) or "-"
        print(f"kept {r['neurons_kept']} of {r['neurons_before']} FFN neurons "
              f"(estimated share {r['estimated_share']:.3f}, {r['k_source']}); estimated speedup "
              + ", ".join(f"{k} {v:.2f}x" for k, v in r["estimated_speedup"].items())
              + f"; measured {measured}; structure.png shows the kept structure per layer")
    return 0
