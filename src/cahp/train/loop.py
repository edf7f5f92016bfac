"""The training loop shared by task fine-tuning (`cahp.train.finetune`) and distillation (`cahp.train.distill`).

Both run the same loop and differ only in what they pass in: the batch loss, the
held-out score an epoch is judged by, whether the state before training is a
candidate, and the shuffle seed of the first epoch.

- seeded: ``torch.manual_seed(seed + rank)`` before anything draws (dropout
  differs between ranks' batches); epoch ``e``'s batch order is
  `make_batches`'s shuffle with seed ``seed * 1000 + epoch_seed_start + e - 1``;
- AdamW over `param_groups` (no weight decay on biases and LayerNorm weights),
  linear warm-up then linear decay (`linear_schedule`) over every step of every
  epoch, gradient clipping at ``max_grad_norm`` (0: none);
- under torchrun the model trains through `DistributedDataParallel` on each
  rank's share of the batches (padded by repeating batches to a multiple of the
  process count, `cahp.core.distributed.pad_batches`), and the epoch's train loss
  is summed over the ranks;
- after every epoch the held-out score (higher is better); the best epoch's state
  is kept (a tie keeps the earlier one), training stops after ``patience`` epochs
  without a better score (0: never early), and the best state is loaded at the end;
- with a `cahp.train.resume.EpochCheckpoint`, the state after every epoch is
  kept there and a run interrupted after epoch e goes on from epoch e + 1,
  ending with the same weights (one process only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.core import distributed
from cahp.core.io import to_jsonable
from cahp.data.batching import EncodedDataset, make_batches
from cahp.train.resume import EpochCheckpoint

log = logging.getLogger(__name__)

__all__ = ["LoopResult", "linear_schedule", "param_groups", "steps_per_epoch", "train_loop"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of ``model``'s trainable parameters: ``weight_decay`` on matrices, none on biases
    and norm weights (one-dimensional tensors, or names containing "norm" in any case: LayerNorm, layer_norm,
    RMSNorm's input_layernorm / norm)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(total_steps: int, warmup_steps: int):
    """Learning-rate factor per step: linear warm-up over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Optimizer steps every rank takes per epoch: the batches of ``n_examples``, spread over the processes
    (the last round padded, so every rank takes as many)."""
    n_proc = distributed.world_size() if distributed.is_active() else 1
    n_batches = -(-n_examples // batch_size)
    return -(-n_batches // n_proc)


@dataclass
class LoopResult:
    """What `train_loop` did.

    ``best_epoch`` is 0 when the state before training stayed the best (only with ``evaluate_before``), -1 when
    no epoch was evaluated as better than nothing; ``best_fields`` are that evaluation's fields; ``history``
    holds one record per evaluation (``{"epoch": 0, **fields}`` first with ``evaluate_before``, then per epoch
    ``{"epoch", "train_loss", **fields, "lr_end", "seconds", "train_seconds", "data_seconds"}``).
    """

    best_epoch: int
    best_score: float
    best_fields: dict
    initial_score: float | None
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


def train_loop(
    model: nn.Module,
    train_ds: EncodedDataset,
    loss_fn: Callable[[nn.Module, dict, torch.device], torch.Tensor],
    evaluate: Callable[[], tuple[float, dict]],
    cfg,
    pad_token_id: int,
    *,
    score_name: str,
    desc: str = "epoch",
    evaluate_before: bool = False,
    epoch_seed_start: int = 0,
    find_unused_parameters: bool = False,
    checkpoint: EpochCheckpoint | None = None,
    progress: bool = True,
) -> LoopResult:
    """Train ``model`` in place for up to ``cfg.epochs`` epochs and load its best state (see the module docstring).

    Args:
        model: the model to train (not wrapped; the loop wraps it in DDP under torchrun).
        train_ds: the training examples, batched each epoch by length with a seeded shuffle.
        loss_fn: ``(model or its DDP wrapper, batch, device) -> scalar loss`` of one batch (mean over it).
        evaluate: ``() -> (score, fields)``: the held-out score of ``model`` as it is now (higher is better) and
            the fields its history record gets; every rank must get the same score.
        cfg: a `cahp.train.finetune.FinetuneConfig` (epochs, lr, batch_size, warmup_ratio, weight_decay,
            max_grad_norm, patience, seed), already checked.
        pad_token_id: the tokenizer's pad id.
        score_name: what the score is, for the log ("dev accuracy", "held-out fidelity").
        desc: the progress bar's label of an epoch.
        evaluate_before: score the state before training too; it is a candidate (best epoch 0).
        epoch_seed_start: added to the shuffle seed of every epoch (``seed * 1000 + epoch_seed_start + e - 1``
            for epoch e = 1, 2, ...), so each caller keeps the batch orders it always had.
        find_unused_parameters: DDP's setting (a parameter no loss reaches, such as a BERT pooler under an
            embedding loss, needs True).
        checkpoint: where to keep the state after every epoch and resume from (see `cahp.train.resume`);
            its key is extended by the loop's settings and the data size. Ignored under torchrun.
        progress: show a progress bar (rank 0 only).

    Returns:
        A `LoopResult`; ``model`` holds the best state, in eval mode.
    """
    total = steps_per_epoch(len(train_ds), cfg.batch_size) * cfg.epochs
    torch.manual_seed(cfg.seed + distributed.rank())  # dropout differs between ranks' batches
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, int(cfg.warmup_ratio * total)))
    best_score, best_epoch, best_state, best_fields, initial = -float("inf"), -1, None, {}, None
    history: list[dict] = []
    bad_epochs, first_epoch, seconds_before = 0, 1, 0.0
    if checkpoint is not None and distributed.is_active():
        log.info("several processes: no epoch checkpoint is kept")
        checkpoint = None
    if checkpoint is not None:
        checkpoint = checkpoint.with_settings(
            loop={k: getattr(cfg, k, None) for k in ("epochs", "lr", "batch_size", "warmup_ratio", "weight_decay",
                                               "max_grad_norm", "patience", "seed")},
            examples=len(train_ds), epoch_seed_start=epoch_seed_start, evaluate_before=evaluate_before)
        state = checkpoint.load()
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if state.get("cuda_rng") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            best_score, best_epoch, best_fields = state["best_score"], state["best_epoch"], state["best_fields"]
            best_state, initial, history = state["best_state"], state["initial"], state["history"]
            bad_epochs, seconds_before = state["bad_epochs"], state["seconds"]
            first_epoch = state["epoch"] + 1
            log.info("resuming after epoch %d of %d (%s)", state["epoch"], cfg.epochs, checkpoint.path)
    if evaluate_before and first_epoch == 1:
        initial, best_fields = evaluate()
        best_score, best_epoch = initial, 0
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": 0, **best_fields})
        log.info("before training: %s %.4f", score_name, initial)
    train_model = distributed.wrap_ddp(model, find_unused_parameters=find_unused_parameters)  # ``model``, 1 process
    t_start = time.perf_counter() - seconds_before
    for epoch in range(first_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        batches = make_batches(train_ds, cfg.batch_size, shuffle=True,
                               seed=cfg.seed * 1000 + epoch_seed_start + epoch - 1, pad_token_id=pad_token_id)
        batches = distributed.shard(distributed.pad_batches(batches))
        t_data = time.perf_counter() - t0
        train_model.train()
        losses = []
        bar = tqdm(batches, desc=f"{desc} {epoch}/{cfg.epochs}", disable=not distributed.show_progress(progress),
                   mininterval=2)
        for batch in bar:
            loss = loss_fn(train_model, batch, device)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        # every rank's losses: the epoch's mean train loss over all batches of all ranks
        loss_sum, n_losses = distributed.all_reduce_sum(torch.tensor(sum(losses), dtype=torch.float64), len(losses))
        t_train = time.perf_counter() - t0
        score, fields = evaluate()
        record = {"epoch": epoch, "train_loss": float(loss_sum) / max(1, n_losses), **fields,
                  "lr_end": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0,
                  "train_seconds": t_train, "data_seconds": t_data}
        history.append(record)
        log.info("%s %d: train loss %.5f, %s %.4f (%.0f s)", desc, epoch, record["train_loss"], score_name, score,
                 record["seconds"])
        if score > best_score:
            best_score, best_epoch, best_fields, bad_epochs = score, epoch, fields, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if cfg.patience and bad_epochs >= cfg.patience:
                log.info("early stop: no better %s for %d epochs", score_name, bad_epochs)
                break
        if checkpoint is not None and epoch < cfg.epochs:
            checkpoint.save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                             # JSON values only: the checkpoint is read back with weights_only
                             "best_score": float(best_score), "best_epoch": best_epoch,
                             "best_fields": to_jsonable(best_fields), "best_state": best_state,
                             "initial": None if initial is None else float(initial), "history": to_jsonable(history),
                             "bad_epochs": bad_epochs, "seconds": time.perf_counter() - t_start})
    if checkpoint is not None:
        checkpoint.clear()
    del train_model  # drops the DDP wrapper (and its gradient hooks); ``model`` keeps the weights
    if best_state is None:  # every score was NaN: there is no best epoch to restore
        raise ValueError(f"no epoch gave a comparable {score_name} (every score was NaN)")
    model.load_state_dict(best_state)
    model.eval()
    return LoopResult(best_epoch=best_epoch, best_score=best_score, best_fields=best_fields, initial_score=initial,
                      history=history, train_seconds=time.perf_counter() - t_start)
