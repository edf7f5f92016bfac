"""Architecture adapters: one small module per model family.

`get_adapter(model_or_config)` returns the adapter for a model; any other
architecture raises `UnsupportedArchitectureError` naming the supported ones.
"""

from __future__ import annotations

from .base import ArchAdapter, LayerFFN, LayerHeads, ResidualOnlyAttention, ResidualOnlyFFN
from .bert import BertAdapter
from .distilbert import DistilBertAdapter
from .llama import LlamaAdapter
from .mpnet import MPNetAdapter

ADAPTERS: tuple[ArchAdapter, ...] = (BertAdapter(), DistilBertAdapter(), MPNetAdapter(), LlamaAdapter())


class UnsupportedArchitectureError(ValueError):
    """The model family has no adapter."""


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model_or_config) -> ArchAdapter:
    """Adapter for a model (or its config), chosen by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"cahp cannot prune heads of model type {model_type!r}; supported model types: "
        + ", ".join(supported_model_types())
    )


__all__ = [
    "ADAPTERS",
    "ArchAdapter",
    "LayerFFN",
    "LayerHeads",
    "ResidualOnlyAttention",
    "ResidualOnlyFFN",
    "UnsupportedArchitectureError",
    "get_adapter",
    "supported_model_types",
]
