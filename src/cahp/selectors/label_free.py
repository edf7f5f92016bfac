"""The Fisher baseline without labels: Kwon et al.'s search and rearrangement on the embedding loss.

`cahp compare --objective embedding` (`cahp.pipelines.compare_embedding`) swaps
the registry's Fisher selector for `LabelFreeFisher`: the texts have no labels,
so the rearrangement's per-batch gate gradients are taken of the salience
pass's noisy-target embedding loss instead of the labelled loss.
`cahp compare --objective embedding --ffn` (`cahp.pipelines.compare_embedding_ffn`)
does the same for the joint (heads + FFN neurons) method: `LabelFreeJointFisher`
takes the per-batch head and neuron gate gradients of that loss
(`cahp.stats.fisher.collect_joint_gate_gradients` given it as ``loss_fn``).
The search's Fisher diagonals are the joint problem's, from the neuron pass of
the same loss; mask tuning needs no loss at all (it matches the dense model's
block outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cahp.selectors.base import SelectionContext, require
from cahp.selectors.fisher import FisherSearchSelector
from cahp.selectors.joint_base import JointProblem
from cahp.selectors.joint_fisher import KwonJointFisher
from cahp.stats.fisher import BatchGateGradients, collect_joint_gate_gradients
from cahp.stats.salience import iter_gate_gradients

__all__ = ["LabelFreeFisher", "LabelFreeJointFisher"]


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
            cache.update(model=model, batches=batches, grads=collect_joint_gate_gradients(
                model, batches, loss_fn=self.loss_fn))
        return cache["grads"]
