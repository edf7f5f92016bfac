"""One protocol for every head selector, so CAHP and each baseline are peers.

A selector gets the head statistics (`HeadStats`) and a budget k (heads to keep,
over all layers) and returns a bool (layers, heads) mask with exactly k True
entries, chosen globally: layers may end up uneven or empty. Selectors that need
more than the shared statistics (iterative re-scoring, mask search) get the
model and data through `SelectionContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from cahp.selectors.cahp import select_heads


@dataclass
class HeadStats:
    """Statistics of the heads a model still has, computed once and shared.

    Attributes:
        head_ids: (layer, head) of each flat index (layer-major, original numbering).
        shape: (layers, heads) of the original architecture.
        distances: kind -> (H, H) distance matrix over the flat heads.
        salience: (L, H) mean |dL/dgate| (0 for removed heads).
        fisher: (L, H) mean (dL/dgate)^2.
        entropy: (H,) mean attention entropy per flat head.
    """

    head_ids: list[tuple[int, int]]
    shape: tuple[int, int]
    distances: dict[str, torch.Tensor] = field(default_factory=dict)
    salience: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.head_ids)

    def flat(self, per_head: torch.Tensor) -> np.ndarray:
        """(L, H) tensor -> (n,) values of the flat heads."""
        return np.array([float(per_head[layer, h]) for layer, h in self.head_ids])

    def mask_of(self, flat_indices) -> torch.Tensor:
        mask = torch.zeros(self.shape, dtype=torch.bool)
        for i in flat_indices:
            layer, h = self.head_ids[int(i)]
            mask[layer, h] = True
        return mask


@dataclass
class SelectionContext:
    """What data-driven selectors may use beyond `HeadStats`."""

    model: object = None
    batches: list | None = None  # labelled calibration batches
    seed: int = 0


class HeadSelector(Protocol):
    name: str

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """Bool (layers, heads) mask of the k heads to keep."""
        ...


def check_budget(k: int, stats: HeadStats) -> int:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= stats.n:
        raise ValueError(f"cannot keep {k} heads: the model has {stats.n}; choose 1..{stats.n}")
    return int(k)


@dataclass
class CAHPSelector:
    """CAHP: cluster the head graph into k groups, keep each group's most salient head."""

    distance: str = "js"
    clustering: str = "spectral"
    seed: int = 0
    kernel: str = "gaussian"
    bandwidth: str | float = "median"
    name: str = "cahp"

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        k = check_budget(k, stats)
        if self.distance not in stats.distances:
            raise ValueError(f"no {self.distance!r} distances were computed (have: {sorted(stats.distances)})")
        if stats.salience is None:
            raise ValueError("CAHP needs head salience")
        graph = {"kernel": self.kernel, "bandwidth": self.bandwidth} if self.clustering == "spectral" else {}
        chosen = select_heads(
            stats.distances[self.distance].numpy(), stats.flat(stats.salience), k,
            method=self.clustering, seed=self.seed, **graph,
        )
        return stats.mask_of(chosen)

    def settings(self) -> dict:
        return {"distance": self.distance, "clustering": self.clustering, "seed": self.seed,
                "kernel": self.kernel, "bandwidth": self.bandwidth}
