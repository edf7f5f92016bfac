"""Held-out perplexity of a causal LM through head gates, and the perplexity curve over KV-head budgets.

Perplexity = exp(mean next-token NLL over the real tokens of held-out text).
A token counts when it and the token before it are both real (not padding),
so left- and right-padded batches score the same pairs and no prediction is
read from a padded position. Sums are float64, so the value does not depend on
how the text is cut into batches beyond rounding. Gate 0 is exactly the model
without that head (`cahp.model.gates`), so the perplexity through a 0/1 mask
equals the perplexity after surgery; the curve needs no model copy per k.

`sentence_nll` keeps the same sums per held-out sentence (the records of the
paired bootstrap of `cahp.pipelines.verdicts.paired_nll`).

The curve's score is -log perplexity (= minus the mean NLL), higher is better,
as `cahp.budget.knee.find_knee` expects.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.model.gates import head_gates
from cahp.model.heads import mask_to_heads
from cahp.selectors.base import HeadSelector, SelectionContext
from cahp.selectors.gqa import GQAStats, check_kv_mask

log = logging.getLogger(__name__)

__all__ = ["kv_curve", "lm_loss", "perplexity", "sentence_nll", "token_nll"]


def token_nll(model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL, number of predicted tokens) of one batch; differentiable.

    ``batch``: ``input_ids`` and ``attention_mask`` (B, T). Position t predicts token t+1 where both are real.
    """
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device).bool()
    logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]  # (B, T-1, V)
    valid = mask[:, 1:] & mask[:, :-1]  # (B, T-1)
    target = ids[:, 1:].masked_fill(~valid, -100)
    nll = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                      ignore_index=-100, reduction="sum")
    return nll, valid.sum()


def lm_loss(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """Mean next-token NLL of a batch (the salience and fine-tuning loss; `cahp.stats.salience.LossFn`)."""
    nll, count = token_nll(model, batch, device)
    return nll / count.clamp_min(1)


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[dict], mask: torch.Tensor | None = None,
               progress: bool = False) -> dict:
    """``{"perplexity", "nll", "tokens"}`` of ``model`` on ``batches``, its heads gated by ``mask`` if given.

    ``mask``: (layers, heads) bool or float gate values. ``nll`` is the mean NLL per predicted token (nats).
    Raises ValueError when the batches hold no token to predict.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        if mask is None:
            for batch in tqdm(batches, desc="perplexity", disable=not progress, mininterval=2):
                nll, n = token_nll(model, batch, device)
                total, count = total + float(nll.double()), count + int(n)
        else:
            with head_gates(model, init=mask.float()):
                for batch in tqdm(batches, desc="perplexity", disable=not progress, mininterval=2):
                    nll, n = token_nll(model, batch, device)
                    total, count = total + float(nll.double()), count + int(n)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the held-out batches hold no token to predict")
    mean = total / count
    return {"perplexity": math.exp(min(mean, 700.0)), "nll": mean, "tokens": count}


@torch.no_grad()
def sentence_nll(model: nn.Module, batches: Sequence[dict], mask: torch.Tensor | None = None) -> dict:
    """``{"nll", "tokens", "mean_nll", "perplexity"}`` of every row of ``batches``, the heads gated by ``mask``.

    ``nll``: (sentences,) summed next-token NLL of each row (float64 sums, batch order: `lm_batches` sorts by
    length, the same for every model); ``tokens``: (sentences,) its predicted tokens (a token counts when it
    and the one before it are real, as `token_nll` counts). ``mean_nll`` = sum(nll) / sum(tokens), so ``perplexity``
    equals `perplexity` of the same batches. The records `cahp.pipelines.verdicts.paired_nll` compares.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = [], []

    def score(batch: dict) -> None:
        ids = batch["input_ids"].to(device)
        real = batch["attention_mask"].to(device).bool()
        logits = model(input_ids=ids, attention_mask=real.long()).logits[:, :-1].float()  # (B, T-1, V)
        valid = real[:, 1:] & real[:, :-1]  # (B, T-1)
        target = ids[:, 1:].masked_fill(~valid, -100)
        per_token = nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                reduction="none")  # (B, T-1), 0 where ignored
        nll.extend(per_token.double().sum(1).tolist())
        tokens.extend(valid.sum(1).tolist())

    try:
        if mask is None:
            for b in batches:
                score(b)
        else:
            with head_gates(model, init=mask.float()):
                for b in batches:
                    score(b)
    finally:
        model.train(was_training)
    total = int(sum(tokens))
    if total == 0:
        raise ValueError("the held-out batches hold no token to predict")
    mean = float(sum(nll)) / total
    return {"nll": nll, "tokens": tokens, "mean_nll": mean, "perplexity": math.exp(min(mean, 700.0))}


def kv_curve(model: nn.Module, selector: HeadSelector, stats: GQAStats, ks: Sequence[int],
             batches: Sequence[dict], ctx: SelectionContext | None = None, progress: bool = True) -> dict:
    """Held-out perplexity of ``selector``'s selection at every KV-head budget in ``ks``.

    Returns ``{"points": [{"k", "heads", "perplexity", "nll", "score", "metric", "kept"}], "seconds"}``:
    ``k`` kept KV heads, ``heads`` kept query heads, ``score`` = -log perplexity, ``kept`` {layer: heads}.
    """
    t0 = time.perf_counter()
    points, select_s = [], 0.0
    for k in tqdm(ks, desc=f"curve ({selector.name})", disable=not progress, mininterval=2):
        t = time.perf_counter()
        mask = check_kv_mask(selector.select(int(k), stats, ctx), int(k), stats)
        select_s += time.perf_counter() - t
        ppl = perplexity(model, batches, mask)
        points.append({"k": int(k), "heads": int(mask.sum()), "perplexity": ppl["perplexity"], "nll": ppl["nll"],
                       "score": -ppl["nll"], "metric": "neg_log_perplexity", "kept": mask_to_heads(mask)})
        log.debug("k=%d KV heads: perplexity %.3f", k, ppl["perplexity"])
    return {"points": points, "seconds": {"select": select_s, "total": time.perf_counter() - t0}}
