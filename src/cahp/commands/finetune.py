"""``cahp finetune``: fine-tune a dense or pruned model on a task, keep the best dev epoch."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path

from cahp.commands._common import add_model_task_args, default_output_dir, load_task, task_options
from cahp.core.configs import add_dataclass_args, from_args
from cahp.train.finetune import FinetuneConfig
from cahp.train.teacher import KD_FIELDS

log = logging.getLogger("cahp.train.finetune")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_task_args(p)
    p.add_argument("--output-dir", default=None, help="where to write model/, finetune.json and log.txt "
                   "(default: runs/finetune-MODEL-TASK)")
    p.add_argument("--no-test", action="store_true", help="do not evaluate on the test split at the end")
    add_dataclass_args(p, FinetuneConfig, skip=KD_FIELDS)  # a dense fine-tuning has no teacher


def run(args) -> int:
    import cahp
    from cahp.core import distributed
    from cahp.core.io import add_log_file, write_json
    from cahp.pipelines.guard import clip_max_length, model_config
    from cahp.train.evaluate import evaluate_task
    from cahp.train.finetune import check_config, finetune
    from cahp.train.metrics import resolve_metric

    cfg = from_args(FinetuneConfig, args)
    check_config(cfg)
    # everything checked before the output folder exists: a bad input leaves no folder behind
    task = load_task(args)
    resolve_metric(cfg.metric, task.task_type, task.num_labels)
    cfg.max_length = clip_max_length(cfg.max_length, model_config(args.model))
    model, tok = cahp.load_model(args.model, num_labels=task.num_labels, seed=cfg.seed)
    out = Path(args.output_dir or default_output_dir("finetune", args.model, args.task))
    distributed.on_main(out.mkdir, parents=True, exist_ok=True)  # under torchrun only rank 0 writes
    # the log file is this run's alone: a second run in the same process logs into its own folder
    handler = add_log_file(out / "log.txt") if distributed.is_main() else None
    try:
        distributed.sync_module(model.to(distributed.device()))
        params = cahp.count_parameters(model)
        t0 = time.perf_counter()
        result = finetune(model, tok, task, cfg, output_dir=out / "model")
        report = {
            "model": args.model,
            "task": task.name,
            "task_type": task.task_type,
            "columns": task_options(args),
            "parameters": params,
            "heads_kept": cahp.num_kept(model),
            "config": asdict(cfg),
            "finetune": result.to_dict(),
        }
        if not args.no_test:
            report["test"] = evaluate_task(model, tok, task, max_length=cfg.max_length, batch_size=cfg.eval_batch_size,
                                           seed=cfg.seed)
        report["seconds"] = time.perf_counter() - t0
        distributed.on_main(write_json, out / "finetune.json", report)
        log.info("wrote %s and %s", out / "model", out / "finetune.json")
        return 0
    finally:
        if handler is not None:
            logging.getLogger("cahp").removeHandler(handler)
            handler.close()
