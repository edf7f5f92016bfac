"""``cahp evaluate``: accuracy and macro-F1 with bootstrap 95% intervals, as JSON (of a model or its ONNX file)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cahp.commands._common import add_model_task_args, load_task, task_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_task_args(p)
    p.add_argument("--split", nargs="+", default=None,
                   help="splits to score (default: the test split, plus MNLI's mismatched split)")
    p.add_argument("--max-length", type=int, default=128, help="maximum tokens per example")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--output", default=None, help="also write the JSON to this file")
    p.add_argument("--allow-new-head", action="store_true",
                   help="score a model whose classification head is new (untrained); without it that is an error")
    p.add_argument("--onnx", type=Path, default=None, metavar="FILE",
                   help="score this ONNX file (fp32 or int8, as cahp export writes it) instead of the PyTorch "
                   "model, with the tokenizer of --model")


def run(args) -> int:
    import cahp
    from cahp.core import distributed
    from cahp.core.io import write_json
    from cahp.pipelines.guard import clip_max_length, model_config, new_head_reason
    from cahp.train.evaluate import evaluate_task

    task = load_task(args)
    config = model_config(args.model)
    args.max_length = clip_max_length(args.max_length, config)
    reason = None if args.onnx is not None else new_head_reason(config, task.num_labels)
    if reason and not args.allow_new_head:
        raise ValueError(f"{args.model}'s classification head would be new (random): {reason}; fine-tune it "
                         "first (cahp finetune), or pass --allow-new-head to score it anyway")
    if args.onnx is not None:
        from cahp.deploy.runtime import OnnxClassifier

        model = OnnxClassifier(args.onnx)  # checked before the tokenizer loads
        model.check_labels(task.num_labels)
        _, tok = cahp.load_model(args.model)  # the tokenizer of --model's folder; its weights are not used
        result = {"model": args.model, "onnx": str(args.onnx), "task": task.name}
    else:
        model, tok = cahp.load_model(args.model, num_labels=task.num_labels)
        distributed.sync_module(model.to(distributed.device()))  # under torchrun: rank 0's weights everywhere
        result = {"model": args.model, "task": task.name, "heads_kept": cahp.num_kept(model),
                  "parameters": cahp.count_parameters(model)}
    result["splits"] = evaluate_task(model, tok, task, args.split, max_length=args.max_length,
                                     batch_size=args.batch_size, n_bootstrap=args.bootstrap, seed=args.seed)
    result["task_type"], result["columns"] = task.task_type, task_options(args)
    if not distributed.is_main():  # under torchrun rank 0 prints and writes
        return 0
    json.dump(result, sys.stdout, indent=1)
    print()
    if args.output:
        write_json(args.output, result)
    return 0
