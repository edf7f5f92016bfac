"""The Fisher baseline without labels: Kwon et al.'s search and rearrangement on the embedding loss.

`cahp compare --objective embedding` (`cahp.pipelines.compare_embedding`) swaps
the registry's Fisher selector for `LabelFreeFisher`: the texts have no labels,
so the rearrangement's per-batch gate gradients are taken of the salience
pass's noisy-target embedding loss instead of the labelled loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cahp.selectors.base import SelectionContext, require
from cahp.selectors.fisher import FisherSearchSelector
from cahp.stats.fisher import BatchGateGradients
from cahp.stats.salience import iter_gate_gradients

__all__ = ["LabelFreeFisher"]


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
