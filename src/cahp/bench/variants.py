"""The models a benchmark times: random and uniform selections, the attention-free floor, inference preparation."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.bench.config import BenchError
from cahp.model.heads import KEPT_HEADS_KEY, kept_heads, model_shape


def random_removal(model_or_config, ratio: float, seed: int = 0) -> dict[int, list[int]]:
    """A seeded random selection of ``ratio`` of the heads still present, drawn globally.

    Drawing across all layers at once leaves uneven layers, as a real global
    selection does. Returns ``{layer: [heads to remove]}`` (original numbering).
    """
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
        raise BenchError(f"remove ratio must be a number strictly between 0 and 1, got {ratio!r}")
    present = [(layer, h) for layer, hs in kept_heads(model_or_config).items() for h in hs]
    n = round(ratio * len(present))
    if n < 1 or n >= len(present):
        raise BenchError(
            f"remove ratio {ratio} of {len(present)} heads removes {n}: keep at least one head and remove at least one"
        )
    chosen = random.Random(seed).sample(present, n)
    out: dict[int, list[int]] = {}
    for layer, h in sorted(chosen):
        out.setdefault(layer, []).append(h)
    return out


def emptied_layers_removal(model_or_config, every: int = 2) -> dict[int, list[int]]:
    """Every head of every ``every``-th layer (1, 3, 5, ... for ``every=2``): empty layers."""
    kept = kept_heads(model_or_config)
    return {layer: list(hs) for layer, hs in kept.items() if layer % every == every - 1 and hs}


def uniform_removal(model_or_config, keep: int) -> dict[int, list[int]]:
    """Every layer keeps its first ``keep`` heads: ``{layer: [heads to remove]}`` (original numbering)."""
    kept = kept_heads(model_or_config)
    if not 0 < keep <= min(len(hs) for hs in kept.values()):
        raise BenchError(f"cannot keep {keep} heads in every layer: layers hold {[len(h) for h in kept.values()]}")
    return {layer: list(hs[keep:]) for layer, hs in kept.items() if hs[keep:]}


def no_attention_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the attention block of every layer replaced by its residual path.

    `remove_heads` refuses to remove every head (such a model cannot use its
    context); this builds that model anyway, as the latency floor, by calling
    the adapter below the refusal. ``model`` itself is not changed.
    """
    adapter = get_adapter(model)
    floor = copy.deepcopy(model)
    for layer in adapter.layers(floor):
        if adapter.heads(layer).attention is not None:
            adapter.make_residual_only(layer, floor.config)
    setattr(floor.config, KEPT_HEADS_KEY, {str(i): [] for i in range(len(adapter.layers(floor)))})
    return floor


def count_hooks(model: nn.Module) -> int:
    """Forward (pre-)hooks and backward hooks registered on any module of ``model``."""
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(getattr(m, "_backward_hooks", {}))
        for m in model.modules()
    )


def prepare_for_inference(model: nn.Module, kernel: str | None = None, device: str | torch.device = "cpu"):
    """Eval mode, no gradients, contiguous weights on ``device``, the given attention kernel.

    Refuses a model that still carries hooks (open head gates or an attention
    capture): a pruned model must run without them.
    """
    hooks = count_hooks(model)
    if hooks:
        raise BenchError(
            f"the model carries {hooks} forward hooks (open head gates or attention capture?); close them before timing"
        )
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    if kernel is not None:
        get_adapter(model).set_attention_kernel(model, kernel)
    return model


@dataclass
class Variant:
    """One model in a comparison: its label, module and the share of original heads it removed."""

    label: str
    model: nn.Module
    share_removed: float
    kept: dict[int, list[int]]


def make_variant(label: str, model: nn.Module) -> Variant:
    """``model`` under ``label``, with the share of the original heads it no longer has."""
    kept = kept_heads(model.config)
    n_layers, n_heads = model_shape(model.config)
    total = n_layers * n_heads
    return Variant(label, model, 1 - sum(len(v) for v in kept.values()) / total, kept)
