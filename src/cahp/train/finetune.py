"""Fine-tuning a dense or pruned model on a task (the single fine-tuning after pruning too).

AdamW, linear warm-up then linear decay, gradient clipping, length-bucketed
batches, evaluation on the dev split after every epoch, early stopping, and the
best epoch's weights restored at the end. Pruned models stay pruned: nothing
here depends on the number of heads, and saving goes through `save_pruned`.

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
from tqdm.auto import tqdm

from cahp.core import distributed
from cahp.core.configs import field as cfg_field
from cahp.data.batching import encode, make_batches
from cahp.data.tasks import Task
from cahp.model.checkpoint import save_pruned
from cahp.train.evaluate import evaluate_examples, labelled_loss, model_inputs
from cahp.train.metrics import METRICS, resolve_metric

log = logging.getLogger(__name__)


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


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(total_steps: int, warmup_steps: int):
    """Learning-rate factor per step: linear warm-up over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def finetune(
    model: nn.Module,
    tokenizer,
    task: Task,
    cfg: FinetuneConfig | None = None,
    *,
    train_examples=None,
    dev_examples=None,
    output_dir: str | Path | None = None,
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

    Returns:
        A `FinetuneResult` with the per-epoch history (train loss, dev scores, seconds).
    """
    cfg = cfg or FinetuneConfig()
    check_config(cfg)
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
    n_batches = -(-len(train_ds) // cfg.batch_size)
    steps_per_epoch = -(-n_batches // n_proc)  # every rank takes this many steps (batches padded)
    total = steps_per_epoch * cfg.epochs

    torch.manual_seed(cfg.seed + distributed.rank())  # dropout differs between ranks' batches
    device = next(model.parameters()).device
    train_model = distributed.wrap_ddp(model)  # the model itself with one process
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, int(cfg.warmup_ratio * total)))
    best_score, best_epoch, best_state, best_dev = -float("inf"), -1, None, {}
    history: list[dict] = []
    bad_epochs = 0
    t_start = time.perf_counter()
    log.info(
        "fine-tuning on %s: %d train / %d dev examples, %d epochs x %d steps, lr %g%s",
        task.name, len(train_ds), len(dev_ds), cfg.epochs, steps_per_epoch, cfg.lr,
        f", {n_proc} processes x batch {cfg.batch_size}" if n_proc > 1 else "",
    )
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        batches = make_batches(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch, pad_token_id=pad)
        batches = distributed.shard(distributed.pad_batches(batches))
        t_data = time.perf_counter() - t0
        train_model.train()
        losses = []
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not distributed.show_progress(progress),
                   mininterval=2)
        for batch in bar:
            loss = _loss(train_model, batch, device, task.is_regression)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        loss_sum, n_losses = distributed.all_reduce_sum(torch.tensor(sum(losses), dtype=torch.float64), len(losses))
        t_train = time.perf_counter() - t0
        dev = evaluate_examples(
            model, tokenizer, dev_examples, task.num_labels, max_length=cfg.max_length,
            batch_size=cfg.eval_batch_size, n_bootstrap=0, encoded=dev_ds, desc="dev", progress=progress,
        )
        dev.pop("predictions")
        t_epoch = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / max(1, n_losses),
            "dev": dev,
            "lr_end": sched.get_last_lr()[0],
            "seconds": t_epoch,
            "train_seconds": t_train,
            "data_seconds": t_data,
        }
        history.append(record)
        log.info(
            "epoch %d: train loss %.4f, dev %s %.4f (%.0f s)", epoch + 1, record["train_loss"], metric,
            dev[metric], t_epoch,
        )
        if dev[metric] > best_score:
            best_score, best_epoch, best_dev, bad_epochs = dev[metric], epoch + 1, dev, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if cfg.patience and bad_epochs >= cfg.patience:
                log.info("early stop: no better dev %s for %d epochs", metric, bad_epochs)
                break
    del train_model  # drops the DDP wrapper (and its gradient hooks); ``model`` keeps the weights
    model.load_state_dict(best_state)
    model.eval()
    result = FinetuneResult(
        best_epoch=best_epoch, best_dev=best_dev, history=history,
        train_seconds=time.perf_counter() - t_start, config=asdict(cfg), metric=metric,
    )
    log.info("best epoch %d: dev %s %.4f", best_epoch, metric, best_score)
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
