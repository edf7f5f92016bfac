"""``cahp compare``: CAHP against the baselines at the same budgets and fine-tuning (see cahp.pipelines.compare)."""

from __future__ import annotations

import argparse

from cahp.commands._common import prune_configs
from cahp.core.configs import add_dataclass_args, from_args
from cahp.pipelines.stages import PruneConfig
from cahp.train.finetune import FinetuneConfig

_NOT_FOR_COMPARE = ("keep", "keep_ratio", "skip_final_finetune", "overwrite")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cahp.bench.decode import DecodeTimingConfig
    from cahp.pipelines.compare import CompareConfig
    from cahp.pipelines.joint_config import JointConfig

    p.epilog = (
        "The output folder defaults to the one of `cahp prune` with the same --model and --task, so a compare "
        "run there reuses its fine-tuned model, signatures, salience and curve. The fine-tuning options set the "
        "single fine-tuning after pruning (and the dense control's); when the folder already holds a run, the "
        "dense model keeps the fine-tuning settings recorded in its run.json."
    )
    add_dataclass_args(p, PruneConfig, skip=_NOT_FOR_COMPARE)
    g = p.add_argument_group("fine-tuning (after pruning, the same for every method; and the dense model's)")
    add_dataclass_args(g, FinetuneConfig, skip=("seed",))
    c = p.add_argument_group("comparison")
    add_dataclass_args(c, CompareConfig)
    j = p.add_argument_group("heads and FFN neurons (--ffn)")
    add_dataclass_args(j, JointConfig)
    t = p.add_argument_group("decoder speed (generative decoders only): dense against CAHP's pruned models")
    add_dataclass_args(t, DecodeTimingConfig, prefix="timing")


def run(args) -> int:
    from cahp.bench.decode import DecodeTimingConfig
    from cahp.pipelines.compare import CompareConfig, run_compare
    from cahp.pipelines.joint_config import JointConfig
    from cahp.pipelines.report import verdict_lines

    cfg, ft = prune_configs(args)
    ccfg = from_args(CompareConfig, args)
    result = run_compare(cfg, ft, ccfg, joint=from_args(JointConfig, args),
                         timing=from_args(DecodeTimingConfig, args, prefix="timing"))
    r = result.report
    if r.get("ffn"):
        from cahp.pipelines.report_ffn import summary_lines

        print("\n".join(summary_lines(r)))
        print(f"outputs in {result.output_dir}: compare_ffn.json, compare_ffn.md, frontier.png, compare-ffn/")
        return 0
    unit, total = ("KV heads", r["kv_heads"]) if r.get("budget_unit") == "kv_heads" else ("heads", r["heads"])
    print(f"{r['model']} / {r['task']}: k* = {r['k_star']} of {total} {unit}; budgets "
          + ", ".join(f"{b['label']}={b['k']}" for b in r["budgets"]))
    for line in verdict_lines(r):
        print(f"  {line}")
    print(f"outputs in {result.output_dir}: compare.json, compare.md, compare.png, compare_layers.png, compare/")
    return 0
