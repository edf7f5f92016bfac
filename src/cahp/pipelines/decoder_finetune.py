"""One language-modelling fine-tuning of a (pruned) causal LM on the calibration text.

AdamW with `cahp.train.finetune.FinetuneConfig`'s learning rate, warm-up and
linear decay, weight decay (not on biases and norm weights), gradient clipping
and seed; the loss is the mean next-token NLL of each batch
(`cahp.budget.perplexity.lm_loss`). Every epoch runs (no early stop): the dev
split is the held-out text the perplexities are reported on, so choosing an
epoch by it would make the reported perplexity optimistic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.budget.perplexity import lm_loss
from cahp.train.finetune import FinetuneConfig, linear_schedule
from cahp.train.loop import param_groups

log = logging.getLogger(__name__)

__all__ = ["finetune_lm"]


def finetune_lm(model: nn.Module, batches: Sequence[dict], cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Fine-tune ``model`` in place on ``batches`` (`cahp.data.lm.lm_batches`) for ``cfg.epochs`` epochs.

    The batch order is shuffled per epoch by ``cfg.seed``. Returns ``{"epochs", "steps", "train_loss"
    (mean loss per epoch), "seconds", "config"}``; the model is left in eval mode.
    """
    if not batches:
        raise ValueError("no batch to fine-tune on")
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)  # dropout, if the model has any
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * len(batches)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(steps, int(cfg.warmup_ratio * steps)))
    losses, t0 = [], time.perf_counter()
    model.train()
    try:
        for epoch in range(cfg.epochs):
            total = 0.0
            order = torch.randperm(len(batches), generator=gen).tolist()
            for i in tqdm(order, desc=f"fine-tune LM {epoch + 1}/{cfg.epochs}", disable=not progress, mininterval=2):
                loss = lm_loss(model, batches[i], device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                total += float(loss.detach())
            losses.append(total / len(batches))
            log.info("LM fine-tuning epoch %d: train loss %.4f", epoch + 1, losses[-1])
    finally:
        model.eval()
    return {"epochs": cfg.epochs, "steps": steps, "train_loss": losses, "seconds": round(time.perf_counter() - t0, 2),
            "config": {"lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "seed": cfg.seed,
                       "warmup_ratio": cfg.warmup_ratio, "weight_decay": cfg.weight_decay,
                       "max_grad_norm": cfg.max_grad_norm}}
