"""Gradients of the loss with respect to head gates: the salience of CAHP step 5 (and the Fisher baseline).

One backward pass per batch through `HeadGates` at 1 gives g = dL/dgate
(layers, heads). `GateGradientAccumulator` keeps sum |g| (salience, Michel et
al. 2019) and sum g^2 (the diagonal empirical Fisher of the gates that Kwon et
al. 2022 use). The classification loss only reads the [CLS] position, and
padded positions never reach real tokens, so these gradients come from real
tokens only. A ``loss_fn`` replaces the labelled loss with any other (the
label-free embedding objective of `cahp.train.objectives`, for instance).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.core import distributed
from cahp.model.gates import head_gates
from cahp.model.heads import model_shape
from cahp.train.evaluate import labelled_loss

log = logging.getLogger(__name__)

#: ``loss_fn(model, batch, device) -> scalar tensor``: the loss whose gate gradients are taken.
LossFn = Callable[[nn.Module, dict, torch.device], torch.Tensor]


class GateGradientAccumulator:
    """``add_batch(grad (L, H))``; ``result()`` -> {"salience": mean |g|, "fisher": mean g^2}."""

    def __init__(self, n_layers: int, n_heads: int):
        self.abs_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.sq_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.count = 0

    def add_batch(self, grad: torch.Tensor) -> None:
        g = grad.detach().double().cpu()
        self.abs_sum += g.abs()
        self.sq_sum += g.square()
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("GateGradientAccumulator has seen no batch")
        return {"salience": self.abs_sum / self.count, "fisher": self.sq_sum / self.count}


def iter_gate_gradients(
    model: nn.Module, batches: Iterable[dict], mask: torch.Tensor | None = None, progress: bool = True,
    desc: str = "salience",
    loss_fn: LossFn | None = None,
) -> Iterator[torch.Tensor]:
    """Yield dL/dgate, shape (L, H), for each batch (gates at 1, or at ``mask``).

    L is ``loss_fn(model, batch, device)``; by default the labelled loss (`labelled_loss`).

    Eval mode (no dropout: the gradient of the deployed function); only the
    gates need gradients, so the weights' ``requires_grad`` is switched off
    for the passes and restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with head_gates(model, init=mask.float() if mask is not None else 1.0, requires_grad=True) as gates:
            for batch in tqdm(batches, desc=desc, disable=not progress, mininterval=2):
                (grad,) = torch.autograd.grad((loss_fn or labelled_loss)(model, batch, device), gates.values)
                yield grad
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


def gate_gradients(
    model: nn.Module,
    batches: Iterable[dict],
    mask: torch.Tensor | None = None,
    progress: bool = True,
    reduce=None,
    loss_fn: LossFn | None = None,
) -> dict[str, torch.Tensor]:
    """Salience and Fisher of every head gate over ``batches`` (labelled, unless ``loss_fn`` needs no labels).

    Args:
        mask: optional (layers, heads) gate values to hold the other heads at
            (iterative baselines re-score with removed heads gated to 0).
        reduce: optional all-reduce of the accumulator sums across processes.
            None: under torchrun each rank takes its share of the batches
            (`cahp.core.distributed.shard`) and the sums are all-reduced; with one
            process, nothing. A callable: the caller has sharded ``batches``.
        loss_fn: the loss L (see `iter_gate_gradients`); None: the labelled loss.

    Returns:
        {"salience": (L, H), "fisher": (L, H)} float64; heads the model no
        longer has get 0.
    """
    if reduce is None:
        batches, reduce = distributed.shard(batches), distributed.all_reduce_sum
    n_layers, n_heads = model_shape(model.config)
    acc = GateGradientAccumulator(n_layers, n_heads)
    for grad in iter_gate_gradients(model, batches, mask=mask, progress=distributed.show_progress(progress),
                                    loss_fn=loss_fn):
        acc.add_batch(grad)
    if reduce is not None:
        acc.abs_sum, acc.count = reduce(acc.abs_sum, acc.count)
        acc.sq_sum, _ = reduce(acc.sq_sum, 0)
    return acc.result()
