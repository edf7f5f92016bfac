"""Options shared by several commands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def add_model_task_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument(
        "--model", required=model_required,
        help="short name (minilm-l6, mpnet-base), a model folder (dense or pruned by cahp) or a Hub id",
    )
    from cahp.data.tasks import TASK_TYPES, available_tasks

    p.add_argument(
        "--task", required=True,
        help=f"{', '.join(available_tasks())}, or a folder with train/dev/test .csv/.tsv/.jsonl files",
    )
    p.add_argument(
        "--data-dir", default=None,
        help="folder with the task data (default: $CAHP_DATA_DIR, else ../shared/data if present)",
    )
    p.add_argument("--text-column", default="text", help="user tasks: the text column (default: text)")
    p.add_argument("--text-pair-column", default=None,
                   help="user tasks: the second text column of sentence pairs (default: none)")
    p.add_argument("--label-column", default="label", help="user tasks: the label column (default: label)")
    p.add_argument("--task-type", default="auto", choices=["auto", *TASK_TYPES],
                   help="user tasks: classification or regression (default: auto, from the labels)")


def load_task(args):
    """The task of the options of `add_model_task_args`, every split parsed and checked (`Task.validate`)."""
    from cahp.pipelines.guard import build_task

    task = build_task(args.task, args.data_dir, args.text_column, args.text_pair_column, args.label_column,
                      args.task_type)
    task.validate()
    return task


def task_options(args) -> dict:
    """How the task was read, for a command's JSON record."""
    return {"text_column": args.text_column, "text_pair_column": args.text_pair_column,
            "label_column": args.label_column, "task_type": args.task_type}


def default_output_dir(kind: str, model: str, task: str) -> Path:
    def slug(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(s).name if Path(s).exists() else s).strip("-")

    return Path("runs") / f"{kind}-{slug(model)}-{slug(task)}"


def prune_configs(args):
    """(PruneConfig, FinetuneConfig) from parsed options; the fine-tuning seed follows --seed."""
    from cahp.core.configs import from_args
    from cahp.pipelines.stages import PruneConfig
    from cahp.train.finetune import FinetuneConfig

    cfg = from_args(PruneConfig, args)
    if not cfg.output_dir:
        cfg.output_dir = str(default_output_dir("prune", cfg.model, cfg.task))
    ft = from_args(FinetuneConfig, args)
    ft.seed = cfg.seed
    return cfg, ft
