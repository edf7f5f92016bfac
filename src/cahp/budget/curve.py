"""Stage 6: the score-vs-heads curve, through gates, on held-out training data."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.core import distributed
from cahp.model.gates import head_gates
from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext
from cahp.train.evaluate import predict

log = logging.getLogger(__name__)


def default_grid(n_heads: int, step: int = 0, min_ratio: float = 0.05) -> list[int]:
    """Kept-head counts from all heads down to about ``min_ratio`` of them.

    ``step=0`` picks about 18 points (step = round(n/18), at least 1).
    """
    if n_heads < 1:
        raise ValueError("no heads")
    low = max(1, math.ceil(min_ratio * n_heads))
    step = step or max(1, round(n_heads / 18))
    ks = list(range(n_heads, low - 1, -step))
    if ks[-1] != low:
        ks.append(low)
    return ks


def score_mask(model: nn.Module, mask: torch.Tensor, batches: Sequence[dict], labels: np.ndarray) -> float:
    """Accuracy of ``model`` with only the heads in ``mask`` switched on (gates 0/1).

    Collective under torchrun (`predict` shards the batches and gathers the logits).
    """
    with head_gates(model, init=mask.float()):
        preds, _ = predict(model, batches, len(labels), progress=False)
    return float((preds == labels).mean())


def selection_curve(
    model: nn.Module,
    selector: HeadSelector,
    stats: HeadStats,
    ks: Sequence[int],
    batches: Sequence[dict],
    labels: np.ndarray,
    ctx: SelectionContext | None = None,
    progress: bool = True,
) -> list[dict]:
    """Score S(k) for every k in ``ks``: ``[{"k", "accuracy", "kept": {layer: [heads]}}]``.

    Under torchrun every rank selects (selectors may themselves pass over data) and
    rank 0's mask is broadcast, so all ranks score the same heads; scoring is sharded.
    """
    points = []
    for k in tqdm(ks, desc=f"curve ({selector.name})", disable=not distributed.show_progress(progress),
                  mininterval=2):
        mask = distributed.broadcast_object(selector.select(int(k), stats, ctx))
        acc = score_mask(model, mask, batches, labels)
        points.append({"k": int(k), "accuracy": acc,
                       "kept": {i: torch.nonzero(mask[i]).flatten().tolist() for i in range(mask.shape[0])}})
        log.debug("k=%d accuracy %.4f", k, acc)
    return points
