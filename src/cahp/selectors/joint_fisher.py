"""Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers") over heads AND FFN neurons.

`KwonJointFisher` is the paper's three steps as a `JointMethod` at an estimated
latency share:

1. Mask search (`fisher_search`): heads and neurons each ranked globally by
   the diagonal empirical Fisher of their gates; for every number n >= 1 of
   kept heads (the top n), the longest prefix of the neuron ranking that
   keeps the estimated share within the target; the n whose kept Fisher is
   largest (pruned Fisher smallest) wins. Their ``search_latency`` does the
   same scan with a latency function per block (slope, plus one forced unit
   per block to pay the fixed costs once); here the cost table's fixed costs
   are paid by the heads and neurons that open a block, so no unit is forced.
2. Mask rearrangement: per layer, the counts fixed, their greedy swap on the
   block-diagonal Fisher (`cahp.selectors.fisher.greedy_rearrange` for heads,
   `rearrange_units` for neurons: the same algorithm vectorised over thousands
   of units), from per-batch gate gradients.
3. Mask tuning (optional, `tune_joint_gates`): their ``rescale_mask``, layer
   by layer heads then neurons, least-squares gate values that make the
   student's block outputs match the dense model's.

`fold_neuron_gates` writes tuned neuron gates into the FFN output projection
(with `cahp.selectors.fisher.fold_gates` for heads) so a pruned model computes
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
from cahp.budget.cost import BlockCost, CostTable, estimated_latency
from cahp.model.heads import model_shape
from cahp.model.neurons import kept_neurons, neuron_shape
from cahp.selectors.fisher import TUNE_SOLVER, greedy_rearrange, lsmr_solve
from cahp.selectors.joint_base import SHARE_TOL, JointMethod, JointProblem, JointSelection
from cahp.stats.fisher import (
    block_fisher_objective,
    collect_joint_gate_gradients,
    ffn_normal_equations,
    joint_mha_normal_equations,
)

log = logging.getLogger(__name__)

__all__ = ["FisherSearch", "KwonJointFisher", "fisher_search", "fold_neuron_gates", "rearrange_units",
           "tune_joint_gates"]


# ---------------------------------------------------------------------------
# 1. Mask search
# ---------------------------------------------------------------------------


@dataclass
class FisherSearch:
    """Result of `fisher_search`: the kept masks and what the scan found.

    Attributes:
        heads, neurons: (L, H) / (L, d_ff) bool masks of the kept units.
        n_heads, n_neurons: how many of each are kept.
        kept_fisher, pruned_fisher: Fisher sums of the kept / removed units the model holds.
    """

    heads: np.ndarray
    neurons: np.ndarray
    n_heads: int
    n_neurons: int
    kept_fisher: float
    pruned_fisher: float


def _ranking(fisher: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Flat indices of the present units, Fisher descending (ties: lower layer, then lower index first)."""
    flat = np.flatnonzero(present.reshape(-1))
    values = fisher.reshape(-1)[flat]
    return flat[np.argsort(-values, kind="stable")]


def _prefix_costs(layers: np.ndarray, blocks: Sequence[BlockCost]) -> np.ndarray:
    """(len(layers) + 1,) cost of the blocks when the first k ranked units are kept, k = 0..len(layers).

    ``layers[i]``: layer of the i-th ranked unit. A unit that opens a block
    (the layer's first in the ranking) adds ``fixed + per_unit - empty``, any
    other ``per_unit`` (`BlockCost.cost`).
    """
    fixed = np.array([b.fixed for b in blocks], dtype=np.float64)
    per_unit = np.array([b.per_unit for b in blocks], dtype=np.float64)
    empty = np.array([b.empty for b in blocks], dtype=np.float64)
    opens = np.zeros(len(layers), dtype=bool)
    if len(layers):
        _, first = np.unique(layers, return_index=True)
        opens[first] = True
    step = per_unit[layers] + np.where(opens, fixed[layers] - empty[layers], 0.0)
    return np.concatenate([[empty.sum()], empty.sum() + np.cumsum(step)])


def fisher_search(table: CostTable, head_fisher, neuron_fisher, heads_present, neurons_present,
                  share: float) -> FisherSearch:
    """Kwon et al.'s mask search for an estimated latency share of at most ``share``.

    Args:
        table: the cost table (L layers).
        head_fisher, neuron_fisher: (L, H) / (L, d_ff) diagonal Fisher of the gates.
        heads_present, neurons_present: bool masks of the units the model holds (others never kept).
        share: target share of the dense cost, in (0, 1].

    For each n = 1..(heads held), the top n heads by Fisher are kept and the
    neurons are added in decreasing Fisher order while the share stays within
    the target (a prefix of the ranking: the first neuron that does not fit
    ends the fill, as their ``num_neurons`` budget does). Every candidate is
    priced in one vectorised pass (prefix costs of both rankings and a
    ``searchsorted``), so the scan costs O(units log units). The n with the
    largest kept Fisher wins (the smallest n among equals).

    Raises:
        ValueError: bad shapes or share, no head held, or no n within the share.
    """
    hf, nf = np.asarray(head_fisher, dtype=np.float64), np.asarray(neuron_fisher, dtype=np.float64)
    hp, npres = np.asarray(heads_present, dtype=bool), np.asarray(neurons_present, dtype=bool)
    L = table.n_layers
    if hf.shape != hp.shape or nf.shape != npres.shape or hf.shape[0] != L or nf.shape[0] != L:
        raise ValueError(f"Fisher search: head {hf.shape} / neuron {nf.shape} Fisher and masks "
                         f"{hp.shape} / {npres.shape} must match the cost table's {L} layers")
    if not 0 < share <= 1:
        raise ValueError(f"Fisher search: the share must be in (0, 1], got {share}")
    if not hp.any():
        raise ValueError("Fisher search: the model holds no head")
    head_rank, neuron_rank = _ranking(hf, hp), _ranking(nf, npres)
    att = _prefix_costs(head_rank // hf.shape[1], table.attention)  # (NH + 1,)
    ffn = _prefix_costs(neuron_rank // nf.shape[1], table.ffn)  # (NN + 1,)
    total = table.dense_total()
    budget = share * total - table.rest
    # "Add while the share stays within the target": stop at the first prefix over it, even if costs dip after.
    k = np.searchsorted(np.maximum.accumulate(ffn), budget - att[1:], side="right") - 1  # k[n - 1]: neurons for n
    if not (k >= 0).any():
        one = estimated_latency(table, np.bincount(head_rank[:1] // hf.shape[1], minlength=L).tolist(), [0] * L)
        raise ValueError(f"Fisher search: no split of heads and neurons reaches a share of {share:.4f} "
                         f"(one head and no neuron already costs {one:.4f})")
    head_cum = np.concatenate([[0.0], np.cumsum(hf.reshape(-1)[head_rank])])
    neuron_cum = np.concatenate([[0.0], np.cumsum(nf.reshape(-1)[neuron_rank])])
    kept = np.where(k >= 0, head_cum[1:] + neuron_cum[np.maximum(k, 0)], -np.inf)
    n = int(np.argmax(kept)) + 1
    n_neurons = int(k[n - 1])
    heads, neurons = _masks(head_rank[:n], hf.shape), _masks(neuron_rank[:n_neurons], nf.shape)
    # The prefix sums and estimated_latency add the same costs in other orders: settle rounding the safe way.
    while n_neurons and estimated_latency(table, heads.sum(1).tolist(), neurons.sum(1).tolist()) > share + SHARE_TOL:
        n_neurons -= 1
        neurons = _masks(neuron_rank[:n_neurons], nf.shape)
    kept_fisher = float(head_cum[n] + neuron_cum[n_neurons])
    return FisherSearch(heads, neurons, n, n_neurons, kept_fisher,
                        float(head_cum[-1] + neuron_cum[-1] - kept_fisher))


def _masks(flat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    mask[flat] = True
    return mask.reshape(shape)


# ---------------------------------------------------------------------------
# 2. Mask rearrangement
# ---------------------------------------------------------------------------


def rearrange_units(keep: torch.Tensor, grads: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """`greedy_rearrange` for a layer of many units (FFN neurons): the same swaps, vectorised; count kept.

    Args:
        keep: (U,) bool, the units the search kept in this layer.
        grads: (B, U) per-batch gate gradients of the layer.
        present: (U,) bool, units the layer holds (default: all).

    Each kept unit, in ascending order of its Fisher (ties: lower index),
    joins the pruned set, and the pruned unit whose return leaves the
    smallest ‖Σ_{pruned} g‖² goes back. One step is two matrix-vector
    products over (U, B) (the norms expanded, no (U, B) temporary), so 3072
    neurons and 32 batches take a fraction of a second per layer; the pruned
    sum is recomputed every step (no drift), so the estimate never grows, up
    to rounding (putting back the unit just added restores the previous set).
    Ties among candidates go to the lowest index.
    """
    present = torch.ones_like(keep) if present is None else present.bool()
    keep = keep.bool()
    kept = torch.nonzero(keep & present).flatten()
    pruned = present & ~keep
    if kept.numel() == 0 or not bool(pruned.any()):
        return keep.clone()
    G = grads.double().T.contiguous()  # (U, B)
    fisher = G.square().sum(1)
    order = kept[torch.sort(fisher[kept], stable=True).indices].tolist()
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    weight = pruned.double()  # (U,) 1 on the pruned set
    for u in order:
        pruned[u] = True
        weight[u] = 1.0
        total = weight @ G  # (B,) the pruned set's gradient sum, recomputed: no drift over thousands of steps
        # ‖total - g_j‖² = ‖total‖² - 2 g_j·total + ‖g_j‖²; the first term is the same for every j.
        left = fisher - 2.0 * (G @ total)
        back = int(torch.argmin(torch.where(pruned, left, inf)))
        pruned[back] = False
        weight[back] = 0.0
    return present & ~pruned


def _rearranged(mask: torch.Tensor, grads: torch.Tensor, present: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` (a per-layer rearrangement) on every layer of an (L, U) mask with (B, L, U) gradients."""
    return torch.stack([fn(mask[i], grads[:, i], present[i]) for i in range(mask.shape[0])])


# ---------------------------------------------------------------------------
# 3. Mask tuning and folding
# ---------------------------------------------------------------------------


@torch.no_grad()
def tune_joint_gates(model: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor, batches: Sequence[dict],
                     *, first_head_layer: int = 1, damp: float = 1.0, max_scale: float = 10.0,
                     cls_last: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Kwon et al.'s mask tuning (``rescale_mask``): (head gates (L, H), neuron gates (L, d_ff), info).

    Layer by layer: the kept heads' gate values (from ``first_head_layer`` on;
    their code skips layer 0), then the kept neurons', each fitted by damped
    LSMR towards 1 (`lsmr_solve`) so that the block's pre-LayerNorm output
    matches the dense model's, with the student pruned and the earlier blocks
    tuned (`joint_mha_normal_equations`, `ffn_normal_equations`). The last
    layer's FFN is fitted at the first token only with ``cls_last`` (their
    ``cls_only`` for classification: the classifier reads nothing else). A
    failed solve or a scale outside [-max_scale, max_scale] stops the tuning,
    later blocks keep gate 1. Gates are float32, 0 off the masks; info lists
    the tuned layers per kind and why it stopped, if it did.

    Cost: per tuned block, two forward passes (teacher, student) up to the
    block per batch; the FFN system is (m, m) float64 from an O(N m²)
    product per batch (N tokens), 75 MB and a few GFLOP per batch at m = 3072.

    Raises:
        ValueError: a decoder (pre-norm: the FFN input is not the residual the fit assumes).
    """
    adapter = get_adapter(model)
    if adapter.causal:
        raise ValueError("joint mask tuning supports post-norm encoders only (their FFN input is the residual)")
    hg, ng = head_mask.double().clone(), neuron_mask.double().clone()
    info: dict = {"tuned_head_layers": [], "tuned_neuron_layers": [], "stopped": None}
    layers = adapter.layers(model)
    for i, layer in enumerate(layers):
        heads = torch.nonzero(head_mask[i]).flatten().tolist()
        neurons = torch.nonzero(neuron_mask[i]).flatten().tolist()
        steps = []
        if heads and i >= first_head_layer and adapter.heads(layer).o is not None:
            steps.append(("heads", heads))
        if neurons and adapter.ffn(layer).out is not None:
            steps.append(("neurons", neurons))
        for kind, units in steps:
            if kind == "heads":
                ata, atb = joint_mha_normal_equations(model, i, units, hg, ng, batches)
            else:
                ata, atb = ffn_normal_equations(model, i, units, hg, ng, batches,
                                                first_token_only=cls_last and i == len(layers) - 1)
            x, ok = lsmr_solve(ata, atb, damp)
            scale = x[:-1] if kind == "heads" else x  # the heads' last unknown is their column of ones
            if not ok or scale.max() > max_scale or scale.min() < -max_scale:
                info["stopped"] = {"layer": i, "kind": kind,
                                   "reason": "solver failed" if not ok else "scale out of range"}
                log.info("joint mask tuning stopped at layer %d %s (%s)", i, kind, info["stopped"]["reason"])
                return hg.float(), ng.float(), info
            target = hg if kind == "heads" else ng
            target[i, units] *= torch.from_numpy(scale)
            info[f"tuned_{kind[:-1]}_layers"].append(i)
    return hg.float(), ng.float(), info


@torch.no_grad()
def fold_neuron_gates(model: nn.Module, gates: torch.Tensor) -> nn.Module:
    """Scale each kept neuron's column of the FFN output projection by its (L, d_ff) gate value, in place.

    A gate g multiplies the neuron's activation before the output projection,
    so ``W (g a) + b = (g W) a + b``: afterwards the model computes without
    gates what it computed with them. Works on dense and pruned models
    (columns follow `kept_neurons` numbering; empty FFNs are skipped).

    Raises:
        ValueError: gates not of shape (layers, d_ff).
    """
    shape = neuron_shape(model.config)
    if tuple(gates.shape) != tuple(shape):
        raise ValueError(f"neuron gates have shape {tuple(gates.shape)}, expected {tuple(shape)}")
    adapter = get_adapter(model)
    kept = kept_neurons(model.config)
    for i, layer in enumerate(adapter.layers(model)):
        out = adapter.ffn(layer).out
        if out is None:
            continue
        g = gates[i, kept[i]].to(device=out.weight.device, dtype=out.weight.dtype)  # (kept,)
        out.weight.mul_(g[None, :])
    return model


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


def _kept(mask: torch.Tensor) -> dict[int, list[int]]:
    return {i: torch.nonzero(mask[i]).flatten().tolist() for i in range(mask.shape[0])}


@dataclass
class KwonJointFisher(JointMethod):
    """Kwon et al. 2022 over heads and FFN neurons: Fisher mask search, rearrangement, optional mask tuning.

    Settings:
        rearrange: per-layer greedy rearrangement on the block-diagonal Fisher
            (needs ``problem.model`` and ``problem.batches``: one pass of
            per-batch head and neuron gate gradients, `collect_joint_gate_gradients`,
            cached for the model and batches objects last seen; use a new
            instance for a model changed in place).
        tune: least-squares gate values (`tune_joint_gates`) in the selection's
            ``head_gates`` / ``neuron_gates``; fold them after surgery with
            `cahp.selectors.fisher.fold_gates` and `fold_neuron_gates`.
        tune_first_layer: first layer whose heads are tuned (their code: 1).
        cls_last: fit the last FFN at the first token only (classification).

    ``info``: the chosen head and neuron counts, the pruned Fisher sum (the
    search's objective) and the block-diagonal objective
    (`block_fisher_objective`, heads plus neurons) searched and final, and the
    tuning info. Not reproduced: their per-block latency lookup tables (the
    problem's cost table stands in) and their CUDA LSMR (scipy's, same damping and iteration limit).
    """

    rearrange: bool = True
    tune: bool = False
    tune_first_layer: int = 1
    cls_last: bool = True
    name: str = "fisher"
    _grads: dict = field(default_factory=dict, init=False, repr=False)

    def settings(self) -> dict:
        """The dataclass settings, with the mask-tuning solver when it tunes (`TUNE_SOLVER`)."""
        return {**super().settings(), **({"solver": TUNE_SOLVER} if self.tune else {})}

    def batch_gradients(self, problem: JointProblem) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, L, H), (B, L, d_ff)) per-batch gate gradients on ``problem.batches``, cached per model and batches."""
        model = problem.require("model", "Kwon et al.'s rearrangement")
        batches = problem.require("batches", "Kwon et al.'s rearrangement")
        cache = self._grads
        if not (cache and cache["model"] is model and cache["batches"] is batches):
            cache.clear()
            cache.update(model=model, batches=batches, grads=collect_joint_gate_gradients(model, batches))
        return cache["grads"]

    def select(self, share: float, problem: JointProblem) -> JointSelection:
        """Searched (rearranged, tuned as set) heads and neurons within ``share`` of the dense latency."""
        found = fisher_search(problem.table, problem.head_fisher, problem.neuron_fisher,
                              problem.heads_present, problem.neurons_present, share)
        hp = torch.as_tensor(np.asarray(problem.heads_present, dtype=bool))
        npres = torch.as_tensor(np.asarray(problem.neurons_present, dtype=bool))
        heads, neurons = torch.from_numpy(found.heads), torch.from_numpy(found.neurons)
        info = {"n_heads": found.n_heads, "n_neurons": found.n_neurons,
                "pruned_fisher_searched": found.pruned_fisher}
        if self.rearrange:
            gh, gn = self.batch_gradients(problem)
            searched_obj = block_fisher_objective(heads, gh, hp) + block_fisher_objective(neurons, gn, npres)
            heads = _rearranged(heads, gh, hp, greedy_rearrange)
            neurons = _rearranged(neurons, gn, npres, rearrange_units)
            info.update(objective_searched=searched_obj,
                        objective=block_fisher_objective(heads, gh, hp) + block_fisher_objective(neurons, gn, npres))
        hf, nf = np.asarray(problem.head_fisher, np.float64), np.asarray(problem.neuron_fisher, np.float64)
        pruned_h, pruned_n = hp.numpy() & ~heads.numpy(), npres.numpy() & ~neurons.numpy()
        info["pruned_fisher"] = float(hf[pruned_h].sum() + nf[pruned_n].sum())
        sel = JointSelection(heads=_kept(heads), neurons=_kept(neurons), info=info)
        if self.tune:
            model = problem.require("model", "Kwon et al.'s mask tuning")
            batches = problem.require("batches", "Kwon et al.'s mask tuning")
            if tuple(heads.shape) != tuple(model_shape(model.config)):
                raise ValueError(f"Kwon et al.'s mask tuning: the problem's heads {tuple(heads.shape)} do not "
                                 f"match the model's {tuple(model_shape(model.config))}")
            sel.head_gates, sel.neuron_gates, info["tuning"] = tune_joint_gates(
                model, heads, neurons, batches, first_head_layer=self.tune_first_layer, cls_last=self.cls_last)
        return sel
