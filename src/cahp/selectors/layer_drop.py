"""Layer drop as a head selection: keep the heads of the earliest layers, drop the top of the stack.

Dropping the top layers is the strongest of the simple layer-dropping
strategies for BERT-like encoders (Sajjad et al., "On the effect of dropping
layers of pre-trained transformer models", 2023). As a head selector at an
exact budget of k heads it keeps the first k heads in layer order (the flat,
layer-major order of `HeadStats.head_ids`): every head of the early layers and
the lowest-numbered heads of the next one, so it spends the same head budget as
every other selector (`check_mask`). Heads only: the FFN blocks of the layers
whose heads are dropped stay, as they do for every selector of a heads-only
comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext, check_budget

__all__ = ["LayerDropSelector"]


@dataclass
class LayerDropSelector(HeadSelector):
    """Keep the first k heads in layer order: whole early layers, then part of the next (no data, no seed)."""

    name: str = "layer-drop"

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """Bool (layers, heads) mask of the first k of the heads the model still has, in layer-major order.

        `HeadStats.head_ids` need not be sorted (a pruned model lists what it has); sorting them by
        (layer, head) makes the selection depend on the heads alone.
        """
        k = check_budget(k, stats)
        order = sorted(range(stats.n), key=lambda i: stats.head_ids[i])
        return stats.mask_of(order[:k])

    def settings(self) -> dict:
        """No settings."""
        return {}
