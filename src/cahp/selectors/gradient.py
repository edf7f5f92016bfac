"""Gradient importance (Michel et al. 2019): rank heads by E|dL/dgate|, one-shot or iterative.

Global top-k by salience; ``normalize="layer"`` divides each layer's scores by
their L2 norm over the layer's heads (their per-layer normalisation);
``iterative=True`` removes heads in steps (``step`` of the total, as in Michel et
al. and the bertology example, or of the current heads), re-scoring the
remaining heads with the removed ones gated to 0 after every step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext, check_budget, require, top_k
from cahp.stats.salience import gate_gradients

log = logging.getLogger(__name__)

__all__ = ["GradientSelector"]


def _layer_normalize(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Divide each layer's (L, H) scores by their L2 norm over the layer's present heads (Michel et al.)."""
    s = torch.where(present, scores.double(), torch.zeros((), dtype=torch.float64))
    norm = s.square().sum(1, keepdim=True).sqrt()
    return torch.where(norm > 0, s / norm.clamp_min(1e-300), s)


@dataclass
class GradientSelector(HeadSelector):
    """Michel et al. 2019: global top-k of head importance E|dL/dgate|, one-shot or iterative.

    Args:
        normalize: "none", or "layer" to L2-normalise the scores within each
            layer before the global ranking (their per-layer normalisation).
        iterative: remove heads in steps instead of at once, re-scoring the
            remaining heads (``gate_gradients(model, ctx.batches, mask=current)``,
            removed heads gated to 0) after every step. The first step uses
            ``stats.salience`` (the dense scores on the same batches). One
            removal trajectory serves every k: the step that would go below k
            removes only down to k, which is exactly what a run aimed at that k
            does, and the trajectory is extended lazily and cached for the
            model and batches objects last seen (use a new selector for a
            model changed in place). ``stats.salience`` must come from
            ``ctx.batches`` (as in `cahp.pipelines.prune.prepare_run`).
        step: share of heads removed per step (at least 1 head).
        step_of: "total" (share of all heads, Michel et al. and the bertology
            example: 10% of the heads per step) or "current" (share of the
            heads still kept).
    """

    normalize: str = "none"
    iterative: bool = False
    step: float = 0.1
    step_of: str = "total"
    name: str = "gradient"
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.normalize not in ("none", "layer"):
            raise ValueError(f"normalize must be 'none' or 'layer', got {self.normalize!r}")
        if self.step_of not in ("total", "current"):
            raise ValueError(f"step_of must be 'total' or 'current', got {self.step_of!r}")
        if not 0 < self.step < 1:
            raise ValueError(f"step must be in (0, 1), got {self.step}")

    def settings(self) -> dict:
        """Normalisation and whether iterative (with its step when it is)."""
        s = {"normalize": self.normalize, "iterative": self.iterative}
        if self.iterative:
            s.update(step=self.step, step_of=self.step_of)
        return s

    def _scores(self, salience: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(L, H) ranking scores; heads not present get -inf so they are never kept."""
        s = salience.double()
        if self.normalize == "layer":
            s = _layer_normalize(s, present)
        return torch.where(present, s, torch.full_like(s, -math.inf))

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """Top k by salience, or the iterative trajectory's state at k."""
        k = check_budget(k, stats)
        if stats.salience is None:
            raise ValueError("the gradient selector needs stats.salience")
        full = stats.mask_of(range(stats.n))
        if not self.iterative or k == stats.n:
            return top_k(stats, stats.flat(self._scores(stats.salience, full)), k)
        return self._iterative(k, stats, ctx, full)

    def _iterative(self, k: int, stats: HeadStats, ctx, full: torch.Tensor) -> torch.Tensor:
        model = require(ctx, "model", "iterative gradient")
        batches = require(ctx, "batches", "iterative gradient")
        traj = self._cache
        if not (traj and traj["model"] is model and traj["batches"] is batches and traj["heads"] == stats.head_ids):
            # states[i]: kept mask before step i; scores[i]: importance under it
            traj.clear()
            traj.update(model=model, batches=batches, heads=list(stats.head_ids), states=[full],
                        scores=[self._scores(stats.salience, full)])
        states, scores = traj["states"], traj["scores"]
        i = 0
        while True:
            cur = states[i]
            n_cur = int(cur.sum())
            if n_cur == k:
                return cur.clone()
            base = stats.n if self.step_of == "total" else n_cur
            size = max(1, round(self.step * base))
            if n_cur - size <= k:
                return self._remove_lowest(stats, cur, scores[i], n_cur - k)
            if i + 1 == len(states):
                nxt = self._remove_lowest(stats, cur, scores[i], size)
                grads = gate_gradients(model, batches, mask=nxt, progress=False)
                states.append(nxt)
                scores.append(self._scores(grads["salience"], nxt))
                log.debug("iterative gradient: %d heads left, re-scored", int(nxt.sum()))
            i += 1

    @staticmethod
    def _remove_lowest(stats: HeadStats, cur: torch.Tensor, scores: torch.Tensor, m: int) -> torch.Tensor:
        """cur minus its m lowest-scored heads (the same order as top-k keeps: ties keep the lower index)."""
        flat = stats.flat(torch.where(cur, scores, torch.full_like(scores, -math.inf)))
        order = np.argsort(-flat, kind="stable")
        return stats.mask_of(order[: int(cur.sum()) - m])
