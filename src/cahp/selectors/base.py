"""The contract every head selector follows, so CAHP and each baseline are peers.

A selector gets the head statistics (`HeadStats`) and a budget k (heads to keep,
over all layers) and returns a bool (layers, heads) mask with exactly k True
entries, chosen globally: layers may end up uneven or empty. Selectors that need
more than the shared statistics (iterative re-scoring, mask search) get the
model and data through `SelectionContext`.

`HeadSelector` states everything the pipelines use: ``name``, `select`,
`settings` (what defines the selection, part of every cache key), ``tag`` (its
name in file names), `select_gates`
(gate values beside the mask, for selectors that tune them), ``seeded`` (whether
the selection depends on the seed) and `selection_info` (what the last selection
reports beyond its mask).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

__all__ = ["HeadSelector", "HeadStats", "SelectionContext", "check_budget", "check_mask", "require", "top_k"]


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
        """Number of heads the model still has."""
        return len(self.head_ids)

    def flat(self, per_head: torch.Tensor) -> np.ndarray:
        """(L, H) tensor -> (n,) values of the flat heads."""
        return np.array([float(per_head[layer, h]) for layer, h in self.head_ids])

    def mask_of(self, flat_indices: Iterable[int]) -> torch.Tensor:
        """Bool (L, H) mask of the given flat head indices."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        for i in flat_indices:
            layer, h = self.head_ids[int(i)]
            mask[layer, h] = True
        return mask

    def mask_from_heads(self, heads: dict) -> torch.Tensor:
        """Bool (L, H) mask of a ``{layer: [heads]}`` mapping (layer keys may be JSON strings)."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        for layer, hs in heads.items():
            mask[int(layer), list(hs)] = True
        return mask


@dataclass
class SelectionContext:
    """What data-driven selectors may use beyond `HeadStats`."""

    model: object = None
    batches: list | None = None  # labelled calibration batches
    seed: int = 0


class HeadSelector(ABC):
    """A rule that keeps k heads of a model, globally over its layers.

    Subclasses are dataclasses whose fields are their settings; ``name`` is the
    registry name (`cahp.selectors.registry`). Ties are broken by flat head index,
    so a selection is deterministic for its settings (and seed, if ``seeded``).
    """

    name: str
    seeded: ClassVar[bool] = False
    """Whether the selection depends on the selector's ``seed`` (a new seed, new heads)."""

    @abstractmethod
    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """Bool (layers, heads) mask of the k heads to keep."""

    @abstractmethod
    def settings(self) -> dict:
        """The settings that define the selection (JSON values; part of the cache keys and reports)."""

    @property
    def tag(self) -> str:
        """``name``, plus ``-s<seed>`` for a seeded selector (which has a ``seed`` setting): distinct for the
        selectors one run compares, so their cached results get distinct file names."""
        return f"{self.name}-s{self.seed}" if self.seeded else self.name

    def select_gates(self, k: int, stats: HeadStats,
                     ctx: SelectionContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool mask, float (layers, heads) gate values): the mask as floats unless the selector tunes gates."""
        mask = self.select(k, stats, ctx)
        return mask, mask.float()

    def selection_info(self) -> dict:
        """What the most recent selection reports beyond its mask (e.g. a search's objectives); {} by default."""
        return {}


def check_budget(k: int, stats: HeadStats) -> int:
    """``k`` as an int, or a ValueError unless 1 <= k <= the number of heads."""
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= stats.n:
        raise ValueError(f"cannot keep {k} heads: the model has {stats.n}; choose 1..{stats.n}")
    return int(k)


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


def top_k(stats: HeadStats, scores: np.ndarray, k: int) -> torch.Tensor:
    """Mask of the k flat heads with the highest ``(n,)`` scores (ties: lower flat index first)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return stats.mask_of(order[:k])


def require(ctx: SelectionContext | None, what: str, who: str):
    """``ctx.model`` or ``ctx.batches`` (``what``), or a ValueError naming the selector ``who`` that needs it."""
    if what not in ("model", "batches"):
        raise ValueError(f"a SelectionContext has no {what!r}")
    value = None if ctx is None else (ctx.model if what == "model" else ctx.batches)
    if value is None:
        raise ValueError(f"the {who} selector needs ctx.{what} (a SelectionContext with the model and "
                         f"labelled calibration batches)")
    return value
