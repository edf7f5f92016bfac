"""Baseline head selectors: peers of `CAHPSelector` under the same protocol.

Every selector takes a global budget k (heads kept over all layers) and returns
a bool (layers, heads) mask with exactly k True entries, on heads the model
still has; layers may end up uneven or empty. Ties are broken by flat head
index (layer-major), so each selector is deterministic for its settings and
seed. A selector whose choice depends on its seed has ``seeded = True``
(`RandomSelector`; CAHP's clustering seed is a setting, fixed per run).

- `RandomSelector`: a seeded random permutation of the heads; S(k) is its first
  k heads, so random selections are nested in k.
- `MagnitudeSelector`: L2 norm of each head's own weights (its q/k/v rows with
  their biases and its o columns; the shared o bias is not a head's).
- `GradientSelector` (Michel et al. 2019): global top-k by salience
  E|dL/dgate|; ``normalize="layer"`` divides each layer's scores by their L2
  norm over the layer's heads (their per-layer normalisation);
  ``iterative=True`` removes heads in steps (``step`` of the total, as in
  Michel et al. and the bertology example, or of the current heads), re-scoring
  the remaining heads with the removed ones gated to 0 after every step.
- `EntropySelector`: keeps the k heads of lowest mean attention entropy.
- `FisherSearchSelector` (Kwon et al. 2022, "A Fast Post-Training Pruning
  Framework for Transformers"), heads only: mask search, mask rearrangement,
  optional mask tuning; see its docstring for how each step follows the paper.

`select_gates(selector, k, stats, ctx)` returns (mask, gate values): the gate
values are the mask as floats except for a selector that tunes them
(``FisherSearchSelector(tune=True)``); `fold_gates` writes gate values into the
output projection so a pruned model computes what the gated one did.
`SELECTORS` / `make_selector(name, seed, **kw)` build selectors by name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.gates import head_gates
from cahp.model.heads import kept_heads, model_shape
from cahp.selectors.base import CAHPSelector, HeadStats, SelectionContext, check_budget
from cahp.stats.salience import gate_gradients, iter_gate_gradients
from cahp.train.evaluate import model_inputs

log = logging.getLogger(__name__)

__all__ = [
    "SELECTORS",
    "BatchGateGradients",
    "EntropySelector",
    "FisherSearchSelector",
    "GradientSelector",
    "MagnitudeSelector",
    "RandomSelector",
    "block_fisher_objective",
    "check_mask",
    "collect_gate_gradients",
    "fold_gates",
    "greedy_rearrange",
    "head_magnitudes",
    "make_selector",
    "select_gates",
    "tune_gates",
]


# --------------------------------------------------------------------------------------------
# helpers shared by the selectors
# --------------------------------------------------------------------------------------------


def _top_k(stats: HeadStats, scores: np.ndarray, k: int) -> torch.Tensor:
    """Mask of the k flat heads with the highest scores (ties: lower flat index first)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return stats.mask_of(order[:k])


def _require(ctx: SelectionContext | None, what: str, name: str):
    value = getattr(ctx, what, None) if ctx is not None else None
    if value is None:
        raise ValueError(f"the {name} selector needs ctx.{what} (a SelectionContext with the model and "
                         f"labelled calibration batches)")
    return value


def check_mask(mask: torch.Tensor, k: int, stats: HeadStats) -> torch.Tensor:
    """Raise unless ``mask`` is a bool (layers, heads) mask of exactly k heads the model has."""
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(stats.shape):
        raise ValueError(f"a selection must be a bool {tuple(stats.shape)} mask, got {mask.dtype} {tuple(mask.shape)}")
    if int(mask.sum()) != k:
        raise ValueError(f"the selection keeps {int(mask.sum())} heads, not {k}")
    allowed = stats.mask_of(range(stats.n))
    if bool((mask & ~allowed).any()):
        raise ValueError("the selection keeps heads the model no longer has")
    return mask


def select_gates(selector, k: int, stats: HeadStats, ctx: SelectionContext | None = None):
    """(bool mask, float gate values) of a selection: gate values are the mask unless the selector tunes them."""
    if hasattr(selector, "select_gates"):
        return selector.select_gates(k, stats, ctx)
    mask = selector.select(k, stats, ctx)
    return mask, mask.float()


@torch.no_grad()
def fold_gates(model: nn.Module, gates: torch.Tensor) -> nn.Module:
    """Scale each kept head's output-projection columns by its gate value, in place.

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


# --------------------------------------------------------------------------------------------
# random, magnitude, entropy
# --------------------------------------------------------------------------------------------


@dataclass
class RandomSelector:
    """k heads drawn uniformly at random (seeded); nested in k: S(k) = first k of one permutation."""

    seed: int = 0
    name: str = "random"
    seeded: bool = field(default=True, init=False, repr=False)

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        k = check_budget(k, stats)
        perm = np.random.default_rng(self.seed).permutation(stats.n)
        return stats.mask_of(perm[:k])

    def settings(self) -> dict:
        return {"seed": self.seed}


@torch.no_grad()
def head_magnitudes(model: nn.Module) -> torch.Tensor:
    """(L, H) L2 norm of each head's own weights; 0 for heads the model no longer has.

    A head's weights: its rows of the query, key and value projections (with
    their bias entries) and its columns of the output projection.
    """
    adapter = get_adapter(model)
    n_layers, n_heads = model_shape(model.config)
    d = adapter.head_dim(model.config)
    kept = kept_heads(model.config)
    out = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for layer_idx, layer in enumerate(adapter.layers(model)):
        lh = adapter.heads(layer)
        if lh.o is None:
            continue
        for pos, h in enumerate(kept[layer_idx]):
            rows = slice(pos * d, (pos + 1) * d)
            sq = lh.o.weight[:, rows].double().square().sum()
            for proj in (lh.q, lh.k, lh.v):
                sq += proj.weight[rows].double().square().sum()
                if proj.bias is not None:
                    sq += proj.bias[rows].double().square().sum()
            out[layer_idx, h] = float(sq.sqrt())
    return out


@dataclass
class MagnitudeSelector:
    """Keep the k heads whose own weights have the largest L2 norm (`head_magnitudes`)."""

    name: str = "magnitude"

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        k = check_budget(k, stats)
        model = _require(ctx, "model", self.name)
        return _top_k(stats, stats.flat(head_magnitudes(model)), k)

    def settings(self) -> dict:
        return {}


@dataclass
class EntropySelector:
    """Keep the k heads of lowest mean attention entropy (focused heads, as in the bertology analyses)."""

    name: str = "entropy"

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        k = check_budget(k, stats)
        if stats.entropy is None:
            raise ValueError("the entropy selector needs stats.entropy")
        return _top_k(stats, -stats.entropy.double().numpy(), k)

    def settings(self) -> dict:
        return {}


# --------------------------------------------------------------------------------------------
# gradient importance (Michel et al. 2019)
# --------------------------------------------------------------------------------------------


def _layer_normalize(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Divide each layer's scores by their L2 norm over the layer's present heads (Michel et al.)."""
    s = torch.where(present, scores.double(), torch.zeros((), dtype=torch.float64))
    norm = s.square().sum(1, keepdim=True).sqrt()
    return torch.where(norm > 0, s / norm.clamp_min(1e-300), s)


@dataclass
class GradientSelector:
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
        s = {"normalize": self.normalize, "iterative": self.iterative}
        if self.iterative:
            s.update(step=self.step, step_of=self.step_of)
        return s

    def _scores(self, salience: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        s = salience.double()
        if self.normalize == "layer":
            s = _layer_normalize(s, present)
        return torch.where(present, s, torch.full_like(s, -math.inf))

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        k = check_budget(k, stats)
        if stats.salience is None:
            raise ValueError("the gradient selector needs stats.salience")
        full = stats.mask_of(range(stats.n))
        if not self.iterative or k == stats.n:
            return _top_k(stats, stats.flat(self._scores(stats.salience, full)), k)
        return self._iterative(k, stats, ctx, full)

    def _iterative(self, k: int, stats: HeadStats, ctx, full: torch.Tensor) -> torch.Tensor:
        model = _require(ctx, "model", "iterative gradient")
        batches = _require(ctx, "batches", "iterative gradient")
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


# --------------------------------------------------------------------------------------------
# Fisher mask search, rearrangement and tuning (Kwon et al. 2022)
# --------------------------------------------------------------------------------------------


class BatchGateGradients:
    """Accumulator that keeps every batch's gate gradient (the Fisher *matrix* needs them, not just sums).

    ``add_batch(grad (L, H))``; ``result()`` -> (B, L, H) float64; `fisher_matrix(layer)`
    -> (H, H) mean over batches of g gᵀ; `diagonal()` -> (L, H) mean g² (= the
    ``fisher`` of `cahp.stats.salience.gate_gradients` on the same batches).
    """

    def __init__(self):
        self.grads: list[torch.Tensor] = []

    def add_batch(self, grad: torch.Tensor) -> None:
        self.grads.append(grad.detach().double().cpu())

    def result(self) -> torch.Tensor:
        if not self.grads:
            raise ValueError("BatchGateGradients has seen no batch")
        return torch.stack(self.grads)

    def fisher_matrix(self, layer: int) -> torch.Tensor:
        g = self.result()[:, layer]
        return g.T @ g / g.shape[0]

    def diagonal(self) -> torch.Tensor:
        return self.result().square().mean(0)


def collect_gate_gradients(model: nn.Module, batches: Sequence[dict], mask: torch.Tensor | None = None,
                           progress: bool = False) -> torch.Tensor:
    """Per-batch gradients of the loss w.r.t. the head gates: (B, L, H) float64.

    The same passes as `cahp.stats.salience.gate_gradients` (eval mode, only the
    gates need gradients), keeping each batch's gradient vector (Kwon et al.'s
    ``collect_mask_grads``).
    """
    acc = BatchGateGradients()
    for grad in iter_gate_gradients(model, batches, mask=mask, progress=progress, desc="gate gradients"):
        acc.add_batch(grad)
    return acc.result()


def block_fisher_objective(mask: torch.Tensor, grads: torch.Tensor, present: torch.Tensor | None = None) -> float:
    """Block-diagonal Fisher objective of a mask (higher is better; 0 = nothing removed).

    With per-batch gate gradients g_b (Kwon et al.), removing the heads P_l of
    layer l changes the loss by about ½ (1-m)ᵀ F_l (1-m), F_l = mean_b g_b g_bᵀ
    restricted to layer l. The objective is minus the sum over layers:
    ``-½ Σ_l mean_b (Σ_{h ∈ P_l} g_{b,l,h})²``. ``present`` (default: all)
    marks the heads the model has; absent heads are never counted as removed.
    """
    g = grads.double()
    present = torch.ones(mask.shape, dtype=torch.bool) if present is None else present
    removed = (present & ~mask).double()  # (L, H)
    per_batch = (g * removed).sum(-1)  # (B, L)
    return float(-0.5 * per_batch.square().mean(0).sum())


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
        complement = vecs.sum(0, keepdim=True) - vecs
        back = int(torch.argmin(complement.square().sum(1)))
        del pruned[back]
    new = present.clone()
    new[pruned] = False
    return new


class _Stop(Exception):
    """Raised by a capture hook: the forward pass has gone far enough."""


def _capture_layer(model, layer_idx: int, batch: dict, device, gates: torch.Tensor | None):
    """(layer input hidden states, raw input of layer_idx's output projection) for one batch.

    The forward pass stops at that projection; ``gates`` (if given) act on the layers before.
    """
    adapter = get_adapter(model)
    layer = adapter.layers(model)[layer_idx]
    o = adapter.heads(layer).o
    got = {}

    def on_layer(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]

    def on_o(module, args):
        got["x"] = args[0]
        raise _Stop

    handles = [layer.register_forward_pre_hook(on_layer, with_kwargs=True),
               o.register_forward_pre_hook(on_o, prepend=True)]
    try:
        if gates is not None:
            with head_gates(model, init=gates.float()):
                model(**model_inputs(batch, device))
        else:
            model(**model_inputs(batch, device))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got["h"], got["x"]


@torch.no_grad()
def _mha_lstsq(model, layer_idx: int, heads: list[int], gates: torch.Tensor, batches: Sequence[dict]):
    """Normal equations (AᵀA, Aᵀb) of Kwon et al.'s per-layer least squares for the attention block.

    Columns of A: each kept head's contribution to the output projection,
    computed from the student's (pruned, earlier layers tuned) layer input, plus
    a column of ones; b: the teacher's (dense) pre-LayerNorm block output minus
    the projection bias and the student's residual. Real tokens only.
    """
    adapter = get_adapter(model)
    d = adapter.head_dim(model.config)
    o = adapter.heads(adapter.layers(model)[layer_idx]).o
    pos = [kept_heads(model.config)[layer_idx].index(h) for h in heads]
    W = torch.stack([o.weight[:, p * d:(p + 1) * d].double() for p in pos])  # (m, D, d)
    bias = o.bias.double() if o.bias is not None else 0.0
    m = len(heads)
    device = next(model.parameters()).device
    ata = torch.zeros(m + 1, m + 1, dtype=torch.float64, device=device)
    atb = torch.zeros(m + 1, dtype=torch.float64, device=device)
    model.eval()
    for batch in batches:
        real = batch["attention_mask"].to(device).bool()
        h_t, x_t = _capture_layer(model, layer_idx, batch, device, None)
        teacher = (o(x_t) + h_t)[real].double()  # (N, D)
        h_s, x_s = _capture_layer(model, layer_idx, batch, device, gates)
        h_s, x_s = h_s[real].double(), x_s[real].double()
        xs = torch.stack([x_s[:, p * d:(p + 1) * d] for p in pos])  # (m, N, d)
        per_head = torch.einsum("mnd,mhd->mnh", xs, W).reshape(m, -1)  # (m, N*D)
        A = torch.cat([per_head, per_head.new_ones(1, per_head.shape[1])]).T
        b = (teacher - bias - h_s).flatten()
        ata += A.T @ A
        atb += A.T @ b
    return ata.cpu(), atb.cpu()


def _lsmr_solve(ata: torch.Tensor, atb: torch.Tensor, damp: float) -> tuple[np.ndarray, bool]:
    """Kwon et al.'s solver: LSMR on the normal equations for the change from 1, damped towards it."""
    from scipy.sparse.linalg import lsmr

    A = ata.numpy()
    b = atb.numpy() - A.sum(1)
    sol = lsmr(A, b, damp=damp)
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
        ata, atb = _mha_lstsq(model, layer_idx, heads, gates, batches)
        x, ok = _lsmr_solve(ata, atb, damp)
        scale = x[:-1]
        if not ok or scale.max() > max_scale or scale.min() < -max_scale:
            info["stopped"] = {"layer": layer_idx, "reason": "solver failed" if not ok else "scale out of range"}
            log.info("mask tuning stopped at layer %d (%s)", layer_idx, info["stopped"]["reason"])
            break
        gates[layer_idx, heads] *= torch.from_numpy(scale)
        info["tuned_layers"].append(layer_idx)
    return gates.float(), info


@dataclass
class FisherSearchSelector:
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
    lookup tables and their CUDA solver (scipy's LSMR with the same damping is
    used instead).

    ``last`` holds the most recent search: searched mask, final mask, objective
    before and after rearrangement, tuning info.
    """

    rearrange: bool = True
    tune: bool = False
    tune_first_layer: int = 1
    name: str = "fisher"
    _grads: dict = field(default_factory=dict, init=False, repr=False)
    last: dict = field(default_factory=dict, init=False, repr=False)

    def settings(self) -> dict:
        return {"rearrange": self.rearrange, "tune": self.tune,
                **({"tune_first_layer": self.tune_first_layer} if self.tune else {})}

    def batch_gradients(self, ctx: SelectionContext) -> torch.Tensor:
        model = _require(ctx, "model", "Fisher rearrangement")
        batches = _require(ctx, "batches", "Fisher rearrangement")
        cache = self._grads
        if not (cache and cache["model"] is model and cache["batches"] is batches):
            cache.clear()
            cache.update(model=model, batches=batches, grads=collect_gate_gradients(model, batches))
        return cache["grads"]

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        k = check_budget(k, stats)
        if stats.fisher is None:
            raise ValueError("the Fisher selector needs stats.fisher")
        searched = _top_k(stats, stats.flat(stats.fisher), k)
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

    def select_gates(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None):
        mask = self.select(k, stats, ctx)
        if not self.tune:
            return mask, mask.float()
        model = _require(ctx, "model", "Fisher mask tuning")
        batches = _require(ctx, "batches", "Fisher mask tuning")
        gates, info = tune_gates(model, mask, batches, first_layer=self.tune_first_layer)
        self.last["tuning"] = info
        return mask, gates


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

SELECTORS: dict[str, tuple[type, dict]] = {
    "cahp": (CAHPSelector, {}),
    "random": (RandomSelector, {}),
    "magnitude": (MagnitudeSelector, {}),
    "gradient": (GradientSelector, {}),
    "gradient-layernorm": (GradientSelector, {"normalize": "layer"}),
    "gradient-iterative": (GradientSelector, {"iterative": True}),
    "entropy": (EntropySelector, {}),
    "fisher": (FisherSearchSelector, {}),
    "fisher-tuned": (FisherSearchSelector, {"tune": True}),
}
"""name -> (selector class, fixed settings). ``fisher`` = search + rearrangement; ``fisher-tuned`` adds tuning."""


def make_selector(name: str, seed: int = 0, **kw):
    """A selector by registry name; ``seed`` goes to selectors that take one (cahp, random).

    Extra keyword arguments override the selector's settings (e.g.
    ``make_selector("cahp", 0, distance="hellinger")``); the selector's
    ``name`` is the registry name.
    """
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose from {', '.join(SELECTORS)}")
    cls, fixed = SELECTORS[name]
    args = {**fixed, **kw, "name": name}
    if "seed" in cls.__dataclass_fields__:
        args.setdefault("seed", seed)
    return cls(**args)
