"""CAHP step 6, curve: the score S(k) of a selector's k heads, through gates, on held-out training data.

Gate 0 is exactly the model without that head (`cahp.model.gates`), so scoring
through gates equals scoring after surgery, without copying the model per k.
The score is one metric of `cahp.train.metrics` (accuracy by default; Pearson,
Matthews, ... with ``metric``), always higher-is-better, so the knee works the
same for every metric and for regression.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.core import distributed
from cahp.model.gates import head_gates
from cahp.model.heads import mask_to_heads
from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext, check_mask
from cahp.train.evaluate import predict
from cahp.train.metrics import metric_value

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


def curve_score(point: dict) -> float:
    """The score of a curve point: its ``score`` (its ``accuracy`` in curves cached before scores had a metric)."""
    return float(point["score"] if "score" in point else point["accuracy"])


def score_mask(model: nn.Module, mask: torch.Tensor, batches: Sequence[dict], labels: np.ndarray,
               metric: str = "accuracy") -> float:
    """``metric`` of ``model`` with its heads gated by ``mask`` ((layers, heads) bool, or float gate values).

    ``labels``: (n,) class ids, or float scores for a one-output (regression) model. Collective under
    torchrun (`predict` shards the batches and gathers the logits).
    """
    with head_gates(model, init=mask.float()):
        preds, logits = predict(model, batches, len(labels), progress=False)
    return curve_metric(metric, preds, logits, labels)


def curve_metric(metric: str, preds: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> float:
    """``metric`` of `predict`'s (predictions, logits) against ``labels``; accuracy of a classifier directly."""
    if metric == "accuracy" and logits.shape[-1] > 1:
        return float((preds == labels).mean())
    return metric_value(metric, preds, labels, int(logits.shape[-1]))


def selection_curve(
    model: nn.Module,
    selector: HeadSelector,
    stats: HeadStats,
    ks: Sequence[int],
    batches: Sequence[dict],
    labels: np.ndarray,
    ctx: SelectionContext | None = None,
    progress: bool = True,
    metric: str = "accuracy",
) -> dict:
    """Score S(k) (``metric`` on the held-out batches) for every k in ``ks``.

    Each selection is scored through its gate values (`HeadSelector.select_gates`:
    the 0/1 mask, or tuned values for a selector that tunes them).

    Returns:
        ``{"points": [{"k", "score", "metric", "kept": {layer: [heads]}}], "seconds": {"select", "total"}}``,
        ``select`` being the time spent choosing heads, ``total`` the whole curve's. Classification points
        also carry ``accuracy`` (the score itself when ``metric`` is accuracy).

    Under torchrun every rank selects (selectors may themselves pass over data) and
    rank 0's selection is broadcast, so all ranks score the same heads; scoring is sharded.
    """
    t0 = time.perf_counter()
    points, select_s = [], 0.0
    for k in tqdm(ks, desc=f"curve ({selector.name})", disable=not distributed.show_progress(progress),
                  mininterval=2):
        t = time.perf_counter()
        mask, gates = distributed.broadcast_object(selector.select_gates(int(k), stats, ctx))
        check_mask(mask, int(k), stats)
        select_s += time.perf_counter() - t
        if metric == "accuracy" or labels.dtype.kind in "fc":
            value = score_mask(model, gates, batches, labels, metric)
            point = {"k": int(k), "score": value, "metric": metric}
            if labels.dtype.kind not in "fc":
                point["accuracy"] = value
        else:  # one pass for both: the metric drives the knee, accuracy stays in the record
            with head_gates(model, init=gates.float()):
                preds, _ = predict(model, batches, len(labels), progress=False)
            value = metric_value(metric, preds, labels, int(model.config.num_labels))
            point = {"k": int(k), "score": value, "metric": metric, "accuracy": float((preds == labels).mean())}
        points.append({**point, "kept": mask_to_heads(mask)})
        log.debug("k=%d %s %.4f", k, metric, value)
    return {"points": points, "seconds": {"select": select_s, "total": time.perf_counter() - t0}}
