"""The Fisher baseline without labels: Kwon et al.'s search and rearrangement on the embedding loss.

`cahp compare --objective embedding` (`cahp.pipelines.compare_embedding`) swaps
the registry's Fisher selector for `LabelFreeFisher`: the texts have no labels,
so the rearrangement's per-batch gate gradients are taken of the salience
pass's noisy-target embedding loss instead of the labelled loss.
`cahp compare --objective embedding --ffn` (`cahp.pipelines.compare_embedding_ffn`)
does the same for the joint (heads + FFN neurons) method: `LabelFreeJointFisher`
takes the per-batch head and neuron gate gradients of that loss
(`joint_gate_gradients`). The search's Fisher diagonals are the joint problem's,
from the neuron pass of the same loss; mask tuning needs no loss at all (it
matches the dense model's block outputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from cahp.model.gates import head_gates
from cahp.model.neurons import neuron_gates
from cahp.selectors.base import SelectionContext, require
from cahp.selectors.fisher import FisherSearchSelector
from cahp.selectors.joint_base import JointProblem
from cahp.selectors.joint_fisher import KwonJointFisher
from cahp.stats.fisher import BatchGateGradients
from cahp.stats.salience import LossFn, iter_gate_gradients

__all__ = ["LabelFreeFisher", "LabelFreeJointFisher", "joint_gate_gradients"]


@dataclass
class LabelFreeFisher(FisherSearchSelector):
    """The registry's Fisher selector (Kwon et al.), its rearrangement's per-batch gate gradients taken of
    ``loss_fn`` (the embedding loss) instead of the labelled loss, which needs labels the texts do not have.

    ``loss_fn`` is the salience pass's noisy-target embedding loss, so the block Fisher matrices and the
    Fisher diagonal of the search (``stats.fisher``) come from the same gradients. Its settings are the
    registered selector's: the loss is part of the run's cache keys (the salience key).
    """

    loss_fn: object = field(default=None, repr=False, compare=False)

    def batch_gradients(self, ctx: SelectionContext) -> torch.Tensor:
        """(B, L, H) per-batch gate gradients of ``loss_fn`` on ``ctx.batches``, cached for the model and
        batches last seen."""
        model = require(ctx, "model", "Fisher rearrangement")
        batches = require(ctx, "batches", "Fisher rearrangement")
        if self.loss_fn is None:
            raise ValueError("LabelFreeFisher needs loss_fn (the embedding loss)")
        cache = self._grads
        if not (cache and cache["model"] is model and cache["batches"] is batches):
            acc = BatchGateGradients()
            for grad in iter_gate_gradients(model, batches, progress=False, desc="gate gradients",
                                            loss_fn=self.loss_fn):
                acc.add_batch(grad)
            cache.clear()
            cache.update(model=model, batches=batches, grads=acc.result())
        return cache["grads"]


def joint_gate_gradients(model: nn.Module, batches: Sequence[dict],
                         loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch gradients of ``loss_fn`` w.r.t. head AND neuron gates: ((B, L, H), (B, L, d_ff)) float64 on the CPU.

    `cahp.stats.fisher.collect_joint_gate_gradients` with the caller's loss instead of the labelled one (that
    function has no ``loss_fn``): gates at 1, eval mode (the deployed function, no dropout), the weights'
    ``requires_grad`` off for the passes (only the gates need gradients) and restored, as is the training mode.
    Gates the loss never reads (a block the model no longer holds) get 0.
    """
    if not batches:
        raise ValueError("joint_gate_gradients needs at least one batch")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    heads, neurons = [], []
    try:
        with head_gates(model, requires_grad=True) as hg, neuron_gates(model, requires_grad=True) as ng:
            for batch in batches:
                gh, gn = torch.autograd.grad(loss_fn(model, batch, device), (hg.values, ng.values), allow_unused=True)
                heads.append(torch.zeros_like(hg.values) if gh is None else gh)
                neurons.append(torch.zeros_like(ng.values) if gn is None else gn)
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return torch.stack(heads).double().cpu(), torch.stack(neurons).double().cpu()


@dataclass
class LabelFreeJointFisher(KwonJointFisher):
    """The joint registry's Kwon et al. method, its rearrangement's per-batch head and neuron gate gradients taken
    of ``loss_fn`` (the salience pass's noisy-target embedding loss) instead of the labelled loss.

    The search ranks by the problem's Fisher diagonals, which the embedding pipeline's neuron pass computes from
    the same loss on the same batches, so search and rearrangement see one objective. Its settings are the
    registered method's (the loss is part of the joint run's cache keys).
    """

    loss_fn: object = field(default=None, repr=False, compare=False)

    def settings(self) -> dict:
        """The registered method's settings (the loss is described by the run's keys, not here)."""
        return {k: v for k, v in super().settings().items() if k != "loss_fn"}

    def batch_gradients(self, problem: JointProblem) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, L, H), (B, L, d_ff)) gate gradients of ``loss_fn`` on ``problem.batches``, cached per model and
        batches."""
        model = problem.require("model", "Kwon et al.'s rearrangement")
        batches = problem.require("batches", "Kwon et al.'s rearrangement")
        if self.loss_fn is None:
            raise ValueError("LabelFreeJointFisher needs loss_fn (the embedding loss)")
        cache = self._grads
        if not (cache and cache["model"] is model and cache["batches"] is batches):
            cache.clear()
            cache.update(model=model, batches=batches, grads=joint_gate_gradients(model, batches, self.loss_fn))
        return cache["grads"]
