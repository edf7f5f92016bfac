"""Fisher mask search (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers"), heads only.

Mask search, mask rearrangement (`greedy_rearrange`) and optional mask tuning
(`tune_gates`); see `FisherSearchSelector` for how each step follows the paper.
The statistics they use (per-batch gate gradients, the block-diagonal Fisher
objective, the least-squares system) are in `cahp.stats.fisher`. `fold_gates`
writes tuned gate values into the output projection, so a pruned model computes
what the gated one did.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.heads import kept_heads
from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext, check_budget, require, top_k
from cahp.stats.fisher import block_fisher_objective, collect_gate_gradients, mha_normal_equations

log = logging.getLogger(__name__)

__all__ = ["FisherSearchSelector", "fold_gates", "greedy_rearrange", "tune_gates"]


def greedy_rearrange(keep: torch.Tensor, grads: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Kwon et al.'s greedy mask rearrangement of one layer; keeps the layer's head count.

    Args:
        keep: (H,) bool, the heads the search kept in this layer.
        grads: (B, H) per-batch gate gradients of the layer.
        present: (H,) bool, heads the layer still has (default: all).

    The pruned set starts as the searched one; then each kept head, in
    ascending order of its diagonal Fisher, is added to the pruned set and the
    head whose removal from that set leaves the smallest ‖Σ_{pruned} g‖²
    (block-diagonal loss estimate) goes back to the kept set. Putting back the
    head just added restores the previous set, so the estimate never grows.
    Kwon et al. start from the layer's lowest-Fisher heads, which is the same
    set as the global Fisher top-k search leaves (up to ties).
    """
    present = torch.ones_like(keep) if present is None else present
    cand = torch.nonzero(present).flatten().tolist()
    kept = [h for h in cand if keep[h]]
    pruned_init = [h for h in cand if not keep[h]]
    if not kept or not pruned_init:
        return keep.clone()
    G = grads.double().T  # (H, B)
    fisher = G.square().sum(1)
    pruned = sorted(pruned_init, key=lambda h: (float(fisher[h]), h))
    for h in sorted(kept, key=lambda h: (float(fisher[h]), h)):
        pruned.append(h)
        vecs = G[pruned]
        complement = vecs.sum(0, keepdim=True) - vecs  # row j: sum over the pruned set without head j
        back = int(torch.argmin(complement.square().sum(1)))
        del pruned[back]
    new = present.clone()
    new[pruned] = False
    return new


#: Kwon et al.'s iteration limit for LSMR. scipy's default (the number of unknowns) stops an ill-conditioned
#: system at its limit (``istop`` 7), which the success test below reads as a failure and which ends the tuning.
LSMR_MAXITER = 100_000

#: The mask-tuning solver, in the settings (and so the cache keys) of the selectors that tune: tuned gates made
#: with scipy's default iteration limit are not mistaken for these.
TUNE_SOLVER = f"lsmr damped, maxiter {LSMR_MAXITER}"


def lsmr_solve(ata: torch.Tensor, atb: torch.Tensor, damp: float) -> tuple[np.ndarray, bool]:
    """Kwon et al.'s solver: LSMR on the normal equations for the change from 1, damped towards it, with their
    iteration limit (`LSMR_MAXITER`) and success test (LSMR's ``istop`` below 3).

    Returns (solution (m+1,), whether LSMR converged).
    """
    from scipy.sparse.linalg import lsmr

    A = ata.numpy()
    b = atb.numpy() - A.sum(1)  # solve for x - 1, so the damping pulls the gates towards 1
    sol = lsmr(A, b, damp=damp, maxiter=LSMR_MAXITER)
    return sol[0] + 1.0, int(sol[1]) < 3


@torch.no_grad()
def tune_gates(model: nn.Module, mask: torch.Tensor, batches: Sequence[dict], *, first_layer: int = 1,
               damp: float = 1.0, max_scale: float = 10.0) -> tuple[torch.Tensor, dict]:
    """Kwon et al.'s mask tuning for heads: least-squares gate values of the kept heads, layer by layer.

    For each layer from ``first_layer`` on (their code skips layer 0 for
    heads), the kept heads' gate values are fitted so that the pruned layer's
    attention-block output (before LayerNorm) matches the dense model's on
    ``batches``, with the earlier layers already tuned. As in their code, a
    failed solve or a scale outside [-max_scale, max_scale] stops the tuning
    (later layers keep gate 1). Returns (gates (L, H) float32, zero off the
    mask; info with the tuned layers and why it stopped, if it did).
    """
    gates = mask.double().clone()
    info = {"tuned_layers": [], "stopped": None}
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    for layer_idx in range(first_layer, len(layers)):
        heads = torch.nonzero(mask[layer_idx]).flatten().tolist()
        if not heads or adapter.heads(layers[layer_idx]).o is None:
            continue
        ata, atb = mha_normal_equations(model, layer_idx, heads, gates, batches)
        x, ok = lsmr_solve(ata, atb, damp)
        scale = x[:-1]  # the last unknown is the bias column's
        if not ok or scale.max() > max_scale or scale.min() < -max_scale:
            info["stopped"] = {"layer": layer_idx, "reason": "solver failed" if not ok else "scale out of range"}
            log.info("mask tuning stopped at layer %d (%s)", layer_idx, info["stopped"]["reason"])
            break
        gates[layer_idx, heads] *= torch.from_numpy(scale)
        info["tuned_layers"].append(layer_idx)
    return gates.float(), info


@torch.no_grad()
def fold_gates(model: nn.Module, gates: torch.Tensor) -> nn.Module:
    """Scale each kept head's output-projection columns by its (L, H) gate value, in place.

    A gate g multiplies the head's context before the output projection, so
    ``W (g x) + b = (g W) x + b``: after folding, the model computes without
    gates what it computed with them. Works on dense and pruned models (heads
    no longer there are skipped); gate values of 1 change nothing.
    """
    adapter = get_adapter(model)
    d = adapter.head_dim(model.config)
    kept = kept_heads(model.config)
    for layer_idx, layer in enumerate(adapter.layers(model)):
        o = adapter.heads(layer).o
        if o is None:
            continue
        for pos, h in enumerate(kept[layer_idx]):
            g = float(gates[layer_idx, h])
            if g != 1.0:
                o.weight[:, pos * d:(pos + 1) * d] *= g
    return model


@dataclass
class FisherSearchSelector(HeadSelector):
    """Kwon et al. 2022 for a head-count budget: Fisher mask search, rearrangement, optional tuning.

    1. Mask search. Importance of a head = diagonal empirical Fisher of its gate
       (``stats.fisher``: mean over calibration batches of (dL/dgate)²; their
       ``compute_fisher_info`` sums the same squares). Their search for a MAC or
       latency budget scans how to split the budget between heads and FFN
       neurons, each ranked globally by Fisher; with heads only and a head-count
       budget that scan has one choice, so the search keeps the k heads of
       largest Fisher (global, layers uneven or empty).
    2. Mask rearrangement (``rearrange=True``). Per layer, with the head count
       the search gave that layer fixed, `greedy_rearrange` re-picks the heads to
       lower the block-diagonal Fisher estimate of the loss increase (the
       layer's Fisher matrix mean_b g_b g_bᵀ from per-batch gate gradients,
       `collect_gate_gradients` on ``ctx.batches`` with the model as it is, all
       gates 1, as their ``collect_mask_grads``). `block_fisher_objective`
       never decreases. Needs ``ctx.model`` and ``ctx.batches``; the gradients
       are collected once for the model and batches objects last seen and
       cached (use a new selector for a model changed in place).
    3. Mask tuning (``tune=True``): `tune_gates`, their per-layer least squares
       (skip layer 0, stop on failure or |scale| > 10, damped LSMR towards 1).
       `select` returns the mask (tuning does not change it); `select_gates`
       returns (mask, tuned gate values); apply them through `head_gates` or,
       after surgery, with `fold_gates`.

    Not reproduced: FFN neuron masks (cahp prunes heads only), their latency
    lookup tables and their CUDA solver (scipy's LSMR with the same damping and
    iteration limit is used instead).

    ``last`` holds the most recent search: searched mask, final mask, objective
    before and after rearrangement, tuning info; `selection_info` reports its
    objectives and tuning info.
    """

    rearrange: bool = True
    tune: bool = False
    tune_first_layer: int = 1
    name: str = "fisher"
    _grads: dict = field(default_factory=dict, init=False, repr=False)
    last: dict = field(default_factory=dict, init=False, repr=False)

    def settings(self) -> dict:
        """Whether it rearranges and tunes (with the first tuned layer and the solver when it tunes)."""
        return {"rearrange": self.rearrange, "tune": self.tune,
                **({"tune_first_layer": self.tune_first_layer, "solver": TUNE_SOLVER} if self.tune else {})}

    def batch_gradients(self, ctx: SelectionContext) -> torch.Tensor:
        """(B, L, H) per-batch gate gradients on ``ctx.batches``, cached for the model and batches last seen."""
        model = require(ctx, "model", "Fisher rearrangement")
        batches = require(ctx, "batches", "Fisher rearrangement")
        cache = self._grads
        if not (cache and cache["model"] is model and cache["batches"] is batches):
            cache.clear()
            cache.update(model=model, batches=batches, grads=collect_gate_gradients(model, batches))
        return cache["grads"]

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """The searched (and, with ``rearrange``, rearranged) mask of k heads."""
        k = check_budget(k, stats)
        if stats.fisher is None:
            raise ValueError("the Fisher selector needs stats.fisher")
        searched = top_k(stats, stats.flat(stats.fisher), k)
        mask = searched
        self.last = {"k": k, "searched": searched}
        if self.rearrange:
            grads = self.batch_gradients(ctx)
            present = stats.mask_of(range(stats.n))
            mask = torch.stack([greedy_rearrange(searched[i], grads[:, i], present[i])
                                for i in range(searched.shape[0])])
            self.last.update(objective_searched=block_fisher_objective(searched, grads, present),
                             objective=block_fisher_objective(mask, grads, present))
        self.last["mask"] = mask
        return mask

    def select_gates(self, k: int, stats: HeadStats,
                     ctx: SelectionContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, gate values): tuned by least squares with ``tune``, else the mask as floats."""
        mask = self.select(k, stats, ctx)
        if not self.tune:
            return mask, mask.float()
        model = require(ctx, "model", "Fisher mask tuning")
        batches = require(ctx, "batches", "Fisher mask tuning")
        gates, info = tune_gates(model, mask, batches, first_layer=self.tune_first_layer)
        self.last["tuning"] = info
        return mask, gates

    def selection_info(self) -> dict:
        """The objectives before and after rearrangement and the tuning info of the last selection."""
        return {k: v for k, v in self.last.items() if k.startswith("objective") or k == "tuning"}
