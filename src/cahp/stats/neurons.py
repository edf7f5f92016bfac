"""Neuron statistics: salience through neuron gates and activation correlations, in one streamed pass.

For every batch, one forward and one backward pass with neuron gates
(`cahp.model.neurons.neuron_gates`, and head gates `cahp.model.gates.head_gates`
beside them) at 1, the same loss as `cahp.stats.salience.gate_gradients` (the
batch's mean cross-entropy, eval mode, or the caller's ``loss_fn``, e.g. the
label-free embedding distance `cahp.train.objectives.EmbeddingLoss`): ``g = dL/dgate`` for every neuron and
head gives the salience mean ``|g|`` and the Fisher mean ``g^2`` over batches.
During the same forward pass a hook on each layer's activation module reads
the activated intermediate (B, T, d_ff) at the real (non-padding) tokens and
adds it to that layer's `ActivationCorrelationAccumulator` (sums of x and x x^T
in float64). Memory: per layer d_ff^2 float64 (a layer's neurons are only
ever compared with each other), nothing that grows with the calibration size.

Behavioural signature and distance (cahp's choice, not the paper's): neurons of
one layer are compared by the Pearson correlation of their activations over
the real tokens of the calibration sample, and the distance is
``1 - |corr|``. Why: a neuron adds ``a_i(x) * w_i`` to the block output (``w_i``
its column of the output projection). If another neuron's activation is an
affine function of it, ``a_j = alpha * a_i + beta``, its contribution is
recovered by ``w_i += alpha * w_j`` plus a constant that the output bias
absorbs, which the fine-tuning after pruning can learn: ``j`` is redundant
given ``i`` whatever the sign of ``alpha``, and ``corr^2`` is exactly the share
of ``a_j``'s variance that ``a_i`` explains linearly. So ``1 - |corr|`` is 0 for
interchangeable neurons and 1 for linearly unrelated ones. It is not an
information-theoretic divergence like the heads' Jensen-Shannon: an activation
is one real number per token, not a distribution, and mutual information
between two continuous activations needs density estimates for d_ff^2 pairs;
correlation is its sufficient statistic in the Gaussian case (there the
mutual information is ``-log(1 - corr^2) / 2``, a monotone function of
``|corr|``) and streams as sums. Only real tokens count (padded positions still
get activations, which would otherwise weigh in by sentence length); the
comparison stays within a layer (neurons of different layers write to
different residual states and cannot stand in for each other). A neuron that
is constant over the sample (zero variance, e.g. dead) carries no
information, only a constant the output bias absorbs: it is put at distance 0
from every neuron, so it joins a cluster and never forms one on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.arch import get_adapter
from cahp.core import distributed
from cahp.core.allocator import release_freed_memory
from cahp.model.gates import head_gates
from cahp.model.heads import model_shape
from cahp.model.neurons import kept_neurons, neuron_gates, neuron_shape
from cahp.stats.salience import GateGradientAccumulator, LossFn
from cahp.train.evaluate import labelled_loss

log = logging.getLogger(__name__)

#: A neuron whose variance over the sample is at most this share of its mean square is constant.
CONSTANT_RTOL = 1e-10


class ActivationCorrelationAccumulator:
    """Correlation of ``n`` activations over rows: ``add_batch(x (R, n))``; ``result()``.

    Sums in float64 of activations shifted by ``shift`` (the first batch's
    mean, so each batch's product, taken in ``product_dtype``, loses nothing to
    the mean's magnitude): ``sums`` (n,) = sum (x - shift) and ``products``
    (n, n) = sum (x - shift)(x - shift)^T, of which only the blocks on and above
    the diagonal are computed (blocks of `BLOCK` columns: the product is
    symmetric, this skips close to half of its work); ``count`` rows. `raw`
    and `load_raw` give and take the unshifted sums (sum x, sum x x^T) that
    add up across processes.
    """

    BLOCK = 512

    def __init__(self, n: int, product_dtype: torch.dtype = torch.float32):
        self.n = n
        self.product_dtype = product_dtype
        self.shift: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.products: torch.Tensor | None = None
        self.count = 0
        self._edges = [*range(0, n, self.BLOCK), n]

    def add_batch(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.n:
            raise ValueError(f"activations must have shape (rows, {self.n}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        x = x.detach().to(self.product_dtype)
        if self.shift is None:  # accumulators live where the activations are (no per-batch copies)
            self.shift = x.double().mean(0)
            self.sums = torch.zeros(self.n, dtype=torch.float64, device=x.device)
            self.products = torch.zeros(self.n, self.n, dtype=torch.float64, device=x.device)
        xc = x - self.shift.to(x.dtype)  # (R, n)
        self.sums += xc.sum(0, dtype=torch.float64)
        for a, b in zip(self._edges, self._edges[1:]):
            self.products[a:b, a:] += xc[:, a:b].T @ xc[:, a:]  # block row: the diagonal block and right of it
        self.count += int(x.shape[0])

    def _full_products(self) -> torch.Tensor:
        full = self.products.clone()
        for a, b in zip(self._edges, self._edges[1:]):
            full[b:, a:b] = full[a:b, b:].T  # mirror the blocks above the diagonal
        return full

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum x (n,), sum x x^T (n, n)), float64, unshifted."""
        if self.count == 0:
            raise ValueError("ActivationCorrelationAccumulator has seen no row")
        s, s1, n = self.shift, self.sums, self.count
        full = self._full_products()
        full += torch.outer(s, s1) + torch.outer(s1, s) + n * torch.outer(s, s)
        return s1 + n * s, full

    def load_raw(self, sums: torch.Tensor, products: torch.Tensor, count: int) -> None:
        """Replace the state by unshifted sums (e.g. `raw` summed over processes)."""
        self.shift = torch.zeros_like(sums, dtype=torch.float64)
        self.sums, self.products, self.count = sums.double(), products.double(), int(count)

    def result(self) -> dict[str, torch.Tensor]:
        """{"correlation": (n, n), "mean": (n,), "std": (n,), "constant": (n,) bool}, float64 on the CPU.

        Rows and columns of constant neurons hold 0 off the diagonal; the diagonal is 1.
        """
        if self.count == 0:
            raise ValueError("ActivationCorrelationAccumulator has seen no row")
        d = (self.sums / self.count).cpu()  # mean - shift
        cov = self._full_products().cpu() / self.count - torch.outer(d, d)
        mean = self.shift.cpu() + d
        var = cov.diagonal().clamp_min(0)
        constant = var <= CONSTANT_RTOL * (var + mean.square())
        std = var.sqrt()
        inv = torch.where(constant, torch.zeros_like(std), 1 / torch.where(constant, torch.ones_like(std), std))
        corr = (cov * inv[:, None] * inv[None, :]).clamp(-1, 1)
        corr.fill_diagonal_(1.0)
        return {"correlation": corr, "mean": mean, "std": std, "constant": constant}


def correlation_distance(correlation: torch.Tensor, constant: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - |corr|`` (n, n) float64 with a zero diagonal; constant neurons at distance 0 from all."""
    d = 1 - correlation.double().abs()
    if constant is not None and bool(constant.any()):
        d[constant, :] = 0
        d[:, constant] = 0
    d.fill_diagonal_(0.0)
    return d


@dataclass
class NeuronStats:
    """What the neuron pass measured.

    Attributes:
        neuron_ids: per layer, the original indices of the neurons it holds (rows of its correlation).
        salience, fisher: (layers, d_ff) float64 mean ``|dL/dgate|`` and ``(dL/dgate)^2``,
            original numbering; neurons the model no longer has get 0.
        head_salience, head_fisher: (layers, heads) likewise for the heads (None when not asked for).
        correlation, constant, mean, std: per layer over its ``neuron_ids`` (None for an empty FFN,
            or when signatures were not asked for).
        tokens: real tokens seen; examples, batches: calibration examples and batches seen.
        seconds: "passes" (forward and backward), "signatures" (accumulating activations).
    """

    neuron_ids: list[list[int]]
    salience: torch.Tensor
    fisher: torch.Tensor
    head_salience: torch.Tensor | None = None
    head_fisher: torch.Tensor | None = None
    correlation: list[torch.Tensor | None] = field(default_factory=list)
    constant: list[torch.Tensor | None] = field(default_factory=list)
    mean: list[torch.Tensor | None] = field(default_factory=list)
    std: list[torch.Tensor | None] = field(default_factory=list)
    tokens: int = 0
    examples: int = 0
    batches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def distance(self, layer: int) -> torch.Tensor:
        """(n_l, n_l) `correlation_distance` of ``layer``'s neurons (rows in ``neuron_ids[layer]`` order)."""
        if not self.correlation or self.correlation[layer] is None:
            raise ValueError(f"layer {layer} has no neuron correlations (empty FFN, or signatures not collected)")
        return correlation_distance(self.correlation[layer], self.constant[layer])

    def state_dict(self) -> dict:
        """Tensors and plain values only (for `torch.save` / stage caches); inverse of `from_state_dict`."""
        out = {
            "neuron_ids": [torch.tensor(ids, dtype=torch.long) for ids in self.neuron_ids],
            "salience": self.salience,
            "fisher": self.fisher,
            "head_salience": self.head_salience,
            "head_fisher": self.head_fisher,
            "tokens": self.tokens,
            "examples": self.examples,
            "batches": self.batches,
            "seconds": dict(self.seconds),
        }
        for name in ("correlation", "constant", "mean", "std"):
            out[name] = list(getattr(self, name))
        return out

    @classmethod
    def from_state_dict(cls, s: dict) -> NeuronStats:
        return cls(
            neuron_ids=[ids.tolist() for ids in s["neuron_ids"]],
            salience=s["salience"],
            fisher=s["fisher"],
            head_salience=s.get("head_salience"),
            head_fisher=s.get("head_fisher"),
            correlation=list(s.get("correlation", [])),
            constant=list(s.get("constant", [])),
            mean=list(s.get("mean", [])),
            std=list(s.get("std", [])),
            tokens=int(s["tokens"]),
            examples=int(s["examples"]),
            batches=int(s["batches"]),
            seconds=dict(s.get("seconds", {})),
        )


def collect_neuron_stats(
    model: nn.Module,
    batches: Iterable[dict],
    heads: bool = True,
    signatures: bool = True,
    head_mask: torch.Tensor | None = None,
    neuron_mask: torch.Tensor | None = None,
    product_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    reduce=None,
    loss_fn: LossFn | None = None,
) -> NeuronStats:
    """Stream ``batches`` through ``model``: neuron (and head) gate gradients and activation correlations.

    Args:
        model: a supported model, dense or pruned (heads and/or neurons): sequence classification, or a
            bare encoder with a label-free ``loss_fn``.
        batches: padded batches (``attention_mask``, and ``labels`` for the default loss), e.g. the
            calibration sample.
        heads: also accumulate the head gates' gradients (same pass, same loss).
        signatures: also accumulate per-layer activation correlations.
        head_mask, neuron_mask: optional (layers, heads) / (layers, d_ff) gate values to hold the
            gates at (iterative methods gate removed units to 0); default all 1.
        product_dtype: dtype of each batch's activation product (`ActivationCorrelationAccumulator`).
        reduce: as in `cahp.stats.salience.gate_gradients`: None shards the batches under torchrun
            and all-reduces the sums; a callable reduces the caller's shards.
        loss_fn: ``loss_fn(model, batch, device) -> scalar``, the loss L of ``dL/dgate``
            (`cahp.stats.salience.LossFn`); None: the labelled loss (`labelled_loss`).

    Returns:
        `NeuronStats`. The model's weights, training mode and ``requires_grad`` are left as they were.
    """
    if reduce is None:
        batches, reduce = distributed.shard(batches), distributed.all_reduce_sum
    adapter = get_adapter(model)
    n_layers, d_ff = neuron_shape(model.config)
    kept = kept_neurons(model.config)
    neuron_ids = [kept[i] for i in range(n_layers)]
    device = next(model.parameters()).device
    neuron_acc = GateGradientAccumulator(n_layers, d_ff)
    head_acc = GateGradientAccumulator(*model_shape(model.config)) if heads else None
    corr_acc: list[ActivationCorrelationAccumulator | None] = [None] * n_layers
    seconds = {"passes": 0.0, "signatures": 0.0}
    state = {"mask": None}
    examples = 0

    def hook(layer_idx: int):
        def read(module, args, output):
            t = time.perf_counter()
            # output: (B, T, n_l) activated intermediate; rows of real tokens only -> (R, n_l).
            corr_acc[layer_idx].add_batch(output.detach()[state["mask"]])
            seconds["signatures"] += time.perf_counter() - t

        return read

    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        with ExitStack() as stack:
            init = neuron_mask.float() if neuron_mask is not None else 1.0
            ngates = stack.enter_context(neuron_gates(model, init=init, requires_grad=True))
            gate_values = [ngates.values]
            if heads:
                init = head_mask.float() if head_mask is not None else 1.0
                gate_values.append(stack.enter_context(head_gates(model, init=init, requires_grad=True)).values)
            if signatures:
                for i, layer in enumerate(adapter.layers(model)):
                    act = adapter.ffn(layer).act
                    if act is None:  # empty FFN: no neuron to describe
                        continue
                    corr_acc[i] = ActivationCorrelationAccumulator(len(neuron_ids[i]), product_dtype)
                    handle = act.register_forward_hook(hook(i))
                    stack.callback(handle.remove)
            bar = tqdm(batches, desc="neuron stats", disable=not distributed.show_progress(progress), mininterval=2)
            for batch in bar:
                t = time.perf_counter()
                state["mask"] = batch["attention_mask"].to(device).bool()
                grads = torch.autograd.grad((loss_fn or labelled_loss)(model, batch, device), gate_values)
                neuron_acc.add_batch(grads[0])
                if heads:
                    head_acc.add_batch(grads[1])
                examples += int(batch["attention_mask"].shape[0])
                del grads
                release_freed_memory()
                seconds["passes"] += time.perf_counter() - t
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    seconds["passes"] -= seconds["signatures"]  # the hooks ran inside the timed passes
    if reduce is not None:
        for acc in (neuron_acc, head_acc):
            if acc is not None:
                acc.abs_sum, acc.count = reduce(acc.abs_sum, acc.count)
                acc.sq_sum, _ = reduce(acc.sq_sum, 0)
        for acc in corr_acc:
            if acc is not None:
                # Every process holds its own shift: add the unshifted sums (a process without rows adds zeros).
                n = acc.n
                sums, products = acc.raw() if acc.count else (torch.zeros(n, dtype=torch.float64),
                                                              torch.zeros(n, n, dtype=torch.float64))
                sums, count = reduce(sums, acc.count)
                products, _ = reduce(products, 0)
                if count:
                    acc.load_raw(sums, products, count)
        examples = reduce(torch.zeros(1), examples)[1]
    g = neuron_acc.result()
    stats = NeuronStats(neuron_ids=neuron_ids, salience=g["salience"], fisher=g["fisher"], examples=examples,
                        batches=neuron_acc.count, seconds=seconds)
    if heads:
        h = head_acc.result()
        stats.head_salience, stats.head_fisher = h["salience"], h["fisher"]
    if signatures:
        results = [acc.result() if acc is not None and acc.count else None for acc in corr_acc]
        for name in ("correlation", "constant", "mean", "std"):
            setattr(stats, name, [None if r is None else r[name] for r in results])
        stats.tokens = max((acc.count for acc in corr_acc if acc is not None), default=0)
        if stats.tokens == 0 and any(acc is not None for acc in corr_acc):
            raise ValueError("the calibration batches held no real token")
    log.info("neuron stats: %d examples, %d batches, %d real tokens, %d layers", examples, stats.batches,
             stats.tokens, n_layers)
    return stats
