"""Baselines that rank heads by one number each: random, weight magnitude, attention entropy.

- `RandomSelector`: a seeded random permutation of the heads; S(k) is its first
  k heads, so random selections are nested in k.
- `MagnitudeSelector`: L2 norm of each head's own weights (its q rows and o
  columns, the k/v rows of the key/value head it reads, with their biases; the
  shared o bias is not a head's).
- `EntropySelector`: keeps the k heads of lowest mean attention entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.heads import kept_heads, kept_kv_heads, kv_head_of, model_shape
from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext, check_budget, require, top_k

__all__ = ["EntropySelector", "MagnitudeSelector", "RandomSelector", "head_magnitudes"]


@dataclass
class RandomSelector(HeadSelector):
    """k heads drawn uniformly at random (seeded); nested in k: S(k) = first k of one permutation."""

    seed: int = 0
    name: str = "random"
    seeded: ClassVar[bool] = True

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """The first k heads of the seed's permutation of the flat heads."""
        k = check_budget(k, stats)
        perm = np.random.default_rng(self.seed).permutation(stats.n)
        return stats.mask_of(perm[:k])

    def settings(self) -> dict:
        """The seed."""
        return {"seed": self.seed}


@torch.no_grad()
def head_magnitudes(model: nn.Module) -> torch.Tensor:
    """(L, H) L2 norm of each query head's own weights; 0 for heads the model no longer has.

    A head's weights: its rows of the query projection and its columns of the
    output projection, and the key and value rows of the key/value head it
    reads (with their bias entries). In encoders every head has its own
    key/value head; in a grouped-query decoder the query heads of one KV group
    all count that group's k/v rows (the map comes from the adapter,
    `cahp.model.heads.kv_head_of`).
    """
    adapter = get_adapter(model)
    n_layers, n_heads = model_shape(model.config)
    d = adapter.head_dim(model.config)
    kept, kept_kv, kv_of = kept_heads(model.config), kept_kv_heads(model.config), kv_head_of(model.config)
    out = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for layer_idx, layer in enumerate(adapter.layers(model)):
        lh = adapter.heads(layer)
        if lh.o is None:
            continue
        for pos, h in enumerate(kept[layer_idx]):
            rows = slice(pos * d, (pos + 1) * d)  # the head's slice of the (possibly pruned) q rows / o columns
            kv_pos = kept_kv[layer_idx].index(kv_of[h])  # its KV head among the layer's kept ones
            kv_rows = slice(kv_pos * d, (kv_pos + 1) * d)  # the KV head's slice of the k/v rows
            sq = lh.o.weight[:, rows].double().square().sum()
            for proj, sl in ((lh.q, rows), (lh.k, kv_rows), (lh.v, kv_rows)):
                sq += proj.weight[sl].double().square().sum()
                if proj.bias is not None:
                    sq += proj.bias[sl].double().square().sum()
            out[layer_idx, h] = float(sq.sqrt())
    return out


@dataclass
class MagnitudeSelector(HeadSelector):
    """Keep the k heads whose own weights have the largest L2 norm (`head_magnitudes`)."""

    name: str = "magnitude"

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """Top k by weight norm of ``ctx.model``."""
        k = check_budget(k, stats)
        model = require(ctx, "model", self.name)
        return top_k(stats, stats.flat(head_magnitudes(model)), k)

    def settings(self) -> dict:
        """No settings."""
        return {}


@dataclass
class EntropySelector(HeadSelector):
    """Keep the k heads of lowest mean attention entropy (focused heads, as in the bertology analyses)."""

    name: str = "entropy"

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """The k flat heads of lowest ``stats.entropy``."""
        k = check_budget(k, stats)
        if stats.entropy is None:
            raise ValueError("the entropy selector needs stats.entropy")
        return top_k(stats, -stats.entropy.double().numpy(), k)

    def settings(self) -> dict:
        """No settings."""
        return {}
