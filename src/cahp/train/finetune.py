"""Fine-tuning a dense or pruned model on a task (the single fine-tuning after pruning too).

AdamW, linear warm-up then linear decay, gradient clipping, length-bucketed
batches, evaluation on the dev split after every epoch, early stopping, and the
best epoch's weights restored at the end: the loop distillation shares
(`cahp.train.loop.train_loop`), judged here by the dev metric. Pruned models
stay pruned: nothing here depends on the number of heads, and saving goes
through `save_pruned`.

Under torchrun the model is trained through `DistributedDataParallel`: every
rank builds the same seeded batch order of the epoch (padded by repeating
batches to a multiple of the process count) and takes every N-th batch, so one
optimizer step sees N batches (``batch_size`` is per process; the global batch
is N x ``batch_size``). Dev evaluation is sharded and gathered, so the best
epoch and early stopping are the same on every rank; only rank 0 saves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cahp.core import distributed
from cahp.core.configs import field as cfg_field
from cahp.data.batching import encode
from cahp.data.tasks import Task
from cahp.model.checkpoint import save_pruned
from cahp.train.evaluate import evaluate_examples, labelled_loss, model_inputs
from cahp.train.loop import linear_schedule, steps_per_epoch, train_loop
from cahp.train.metrics import METRICS, resolve_metric
from cahp.train.resume import EpochCheckpoint
from cahp.train.teacher import DistillationLoss, finetune_key, teacher_outputs

log = logging.getLogger(__name__)

# linear_schedule stays importable from here (cahp.pipelines.decoder_finetune uses it)
__all__ = ["FinetuneConfig", "FinetuneResult", "check_config", "finetune", "linear_schedule"]


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run."""

    epochs: int = cfg_field(4, "maximum number of epochs")
    lr: float = cfg_field(1e-4, "peak learning rate (AdamW)")
    batch_size: int = cfg_field(32, "training batch size (per process under torchrun)")
    eval_batch_size: int = cfg_field(128, "evaluation batch size")
    max_length: int = cfg_field(128, "maximum tokens per example (longer ones are truncated)")
    warmup_ratio: float = cfg_field(0.1, "share of the steps spent warming the learning rate up from 0")
    weight_decay: float = cfg_field(0.01, "AdamW weight decay (not on biases and LayerNorm weights)")
    max_grad_norm: float = cfg_field(1.0, "gradient clipping norm (0 disables)")
    patience: int = cfg_field(2, "stop after this many epochs without a better dev score (0: never stop early)")
    metric: str = cfg_field(
        "accuracy", "dev metric that selects the best epoch (on a regression task, accuracy means pearson)",
        choices=list(METRICS),
    )
    seed: int = cfg_field(0, "seed of initialisation, shuffling and dropout")
    max_train_examples: int = cfg_field(0, "use only the first N training examples after a seeded shuffle (0: all)")
    kd_alpha: float = cfg_field(
        0.0, "fine-tuning after pruning: weight of distillation from the dense model's outputs, (1 - a) x label "
        "loss + a x distillation loss (0: labels only; ours, cahp.train.teacher)")
    kd_temperature: float = cfg_field(2.0, "softmax temperature of that distillation (classification)")


@dataclass
class FinetuneResult:
    """What a fine-tuning run did: the best epoch, its dev scores, every epoch's record, the settings.

    ``metric`` is the dev metric that chose the best epoch (``config["metric"]`` as resolved for the task).
    """

    best_epoch: int
    best_dev: dict
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    config: dict = field(default_factory=dict)
    metric: str = "accuracy"

    def to_dict(self) -> dict:
        """The result as plain data (JSON-ready)."""
        return asdict(self)


def check_config(cfg: FinetuneConfig) -> None:
    """Refuse impossible settings with a one-line ValueError naming the setting."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.eval_batch_size < 1 or cfg.lr <= 0:
        raise ValueError("epochs, batch_size and eval_batch_size must be >= 1 and lr > 0")
    if cfg.max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {cfg.max_length}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    for name in ("weight_decay", "max_grad_norm", "patience", "max_train_examples"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.kd_alpha <= 1.0:
        raise ValueError(f"kd_alpha must be in [0, 1] (0: no distillation), got {cfg.kd_alpha}")
    if cfg.kd_temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0, got {cfg.kd_temperature}")


def finetune(
    model: nn.Module,
    tokenizer,
    task: Task,
    cfg: FinetuneConfig | None = None,
    *,
    train_examples=None,
    dev_examples=None,
    output_dir: str | Path | None = None,
    checkpoint: EpochCheckpoint | None = None,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``model`` in place; the best dev epoch's weights are loaded at the end.

    Args:
        model: a sequence-classification model (dense or pruned) with ``task.num_labels`` outputs; for a
            regression task one output, trained with the mean squared error.
        task: gives the default train and dev splits, the label count and the task type.
        cfg: settings (`FinetuneConfig` defaults when None).
        train_examples / dev_examples: override the task's train / dev split
            (the CAHP pipeline holds some training examples out).
        output_dir: if given, the best model is saved there with `save_pruned`.
        checkpoint: keep the state after every epoch there and resume an interrupted run from it
            (`cahp.train.resume`); its key must name the model and the data, the settings are added here.
        teacher: the dense model to distil from where ``cfg.kd_alpha`` > 0 (`cahp.train.teacher`; ignored
            otherwise); it is not changed.

    Returns:
        A `FinetuneResult` with the per-epoch history (train loss, dev scores, seconds).
    """
    cfg = cfg or FinetuneConfig()
    check_config(cfg)
    if cfg.kd_alpha and teacher is None:
        raise ValueError("kd_alpha > 0 distils from the dense model: pass it as teacher (the dense model itself "
                         "is trained on the labels only)")
    metric = resolve_metric(cfg.metric, task.task_type, task.num_labels)
    config = getattr(model, "config", None)
    outputs = getattr(config, "num_labels", None)
    if outputs is not None and outputs != task.num_labels:
        raise ValueError(f"the model has {outputs} output(s) but task {task.name!r} needs {task.num_labels}")
    if task.is_regression and config is not None:
        config.problem_type = "regression"  # what transformers' own loss uses if called with labels
    train_examples = list(train_examples if train_examples is not None else task.load(task.train_split))
    dev_examples = list(dev_examples if dev_examples is not None else task.load(task.dev_split))
    if cfg.max_train_examples:
        rng = np.random.default_rng(cfg.seed)
        keep = sorted(rng.permutation(len(train_examples))[: cfg.max_train_examples].tolist())
        train_examples = [train_examples[i] for i in keep]
    pad = tokenizer.pad_token_id or 0
    train_ds = encode(tokenizer, train_examples, cfg.max_length)
    dev_ds = encode(tokenizer, dev_examples, cfg.max_length)
    n_proc = distributed.world_size() if distributed.is_active() else 1
    t_start = time.perf_counter()
    log.info(
        "fine-tuning on %s: %d train / %d dev examples, %d epochs x %d steps, lr %g%s",
        task.name, len(train_ds), len(dev_ds), cfg.epochs, steps_per_epoch(len(train_ds), cfg.batch_size), cfg.lr,
        f", {n_proc} processes x batch {cfg.batch_size}" if n_proc > 1 else "",
    )

    def dev_score() -> tuple[float, dict]:
        dev = evaluate_examples(
            model, tokenizer, dev_examples, task.num_labels, max_length=cfg.max_length,
            batch_size=cfg.eval_batch_size, n_bootstrap=0, encoded=dev_ds, desc="dev", progress=progress,
        )
        dev.pop("predictions")
        return dev[metric], {"dev": dev}

    def loss_fn(m, batch, device):
        return _loss(m, batch, device, task.is_regression)

    if cfg.kd_alpha:
        targets = teacher_outputs(teacher, train_ds, cfg.eval_batch_size, pad, progress=progress)
        if targets.shape[-1] != task.num_labels:
            raise ValueError(f"the teacher has {targets.shape[-1]} output(s) but task {task.name!r} needs "
                             f"{task.num_labels}")
        loss_fn = DistillationLoss(targets, cfg.kd_alpha, cfg.kd_temperature, task.is_regression)
        log.info("distilling from the dense model's outputs: alpha %g, temperature %g", cfg.kd_alpha,
                 cfg.kd_temperature)
    # epochs' shuffle seeds count from seed * 1000 (epoch_seed_start 0), as they always have
    loop = train_loop(model, train_ds, loss_fn, dev_score, cfg, pad, score_name=f"dev {metric}", desc="epoch",
                      progress=progress,
                      checkpoint=None if checkpoint is None else checkpoint.with_settings(finetune=finetune_key(cfg)))
    result = FinetuneResult(
        best_epoch=loop.best_epoch, best_dev=loop.best_fields.get("dev", {}), history=loop.history,
        train_seconds=time.perf_counter() - t_start, config=asdict(cfg), metric=metric,
    )
    log.info("best epoch %d: dev %s %.4f", loop.best_epoch, metric, loop.best_score)
    if output_dir is not None:
        distributed.on_main(save_pruned, model, tokenizer, Path(output_dir))
    return result


def _loss(model: nn.Module, batch: dict, device: torch.device, regression: bool) -> torch.Tensor:
    """The batch's mean loss: cross-entropy (the model's own) or, for regression, MSE of the one output."""
    if not regression:
        return labelled_loss(model, batch, device)
    # logits (batch, 1) -> (batch,) against float labels (batch,)
    logits = model(**model_inputs(batch, device)).logits
    return nn.functional.mse_loss(logits[:, 0].float(), batch["labels"].to(device).float())
