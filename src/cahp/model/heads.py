"""Bookkeeping of which original heads a model still holds.

Head indices always refer to the original numbering ``(layer, head)`` with
``head < config.num_attention_heads`` (DistilBERT: ``n_heads``), also after a
model was pruned twice. With grouped-query attention (Llama-family decoders)
they number query heads; the key/value heads a layer keeps follow from its
query heads (`kept_kv_heads`) and are not recorded separately. The kept heads are recorded in the model config under
`KEPT_HEADS_KEY` as ``{"0": [0, 2, 5], "1": [], ...}`` (every layer listed,
string keys because JSON has no integer keys); a model without the key is dense.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from cahp.arch import get_adapter

KEPT_HEADS_KEY = "cahp_kept_heads"


class HeadIndexError(ValueError):
    """A head or layer index that does not exist, or an impossible selection."""


def model_shape(model_or_config) -> tuple[int, int]:
    """(layers, original heads per layer)."""
    config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(config)
    return adapter.num_layers(config), adapter.num_heads(config)


def describe(model_or_config) -> dict:
    """The family and original shape a measurement records: ``{"model_type", "layers", "heads_per_layer"}``."""
    config = getattr(model_or_config, "config", model_or_config)
    n_layers, n_heads = model_shape(config)
    return {"model_type": config.model_type, "layers": n_layers, "heads_per_layer": n_heads}


def kept_heads(model_or_config) -> dict[int, list[int]]:
    """Original indices of the heads each layer still holds."""
    config = getattr(model_or_config, "config", model_or_config)
    n_layers, n_heads = model_shape(config)
    stored = getattr(config, KEPT_HEADS_KEY, None)
    if stored is None:
        return {layer: list(range(n_heads)) for layer in range(n_layers)}
    return {int(layer): sorted(int(h) for h in heads) for layer, heads in stored.items()}


def kv_head_of(model_or_config) -> list[int]:
    """For each original query head, the original key/value head it reads (grouped-query attention).

    The identity for encoders; ``[0, 0, 0, 1, 1, 1, 2, 2, 2]`` for 9 query heads over 3 key/value heads.
    """
    config = getattr(model_or_config, "config", model_or_config)
    return get_adapter(config).kv_head_of(config)


def kept_kv_heads(model_or_config) -> dict[int, list[int]]:
    """Original indices of the key/value heads each layer still holds.

    A key/value head stays while any query head of its group stays, and goes
    with the last one; a layer with no query head has none.
    """
    of = kv_head_of(model_or_config)
    return {layer: sorted({of[h] for h in heads}) for layer, heads in kept_heads(model_or_config).items()}


def kv_cache_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Bytes one token adds to a decoder's KV cache: keys and values of every kept key/value head.

    ``sum over layers of kept KV heads x head_dim x 2 x element size``, with the
    element size of ``dtype`` (default: the model's parameters). Removing a
    share of the KV heads shrinks it by exactly that share.
    """
    config = model.config
    d = get_adapter(config).head_dim(config)
    dtype = dtype or next(model.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    return sum(len(kv) for kv in kept_kv_heads(config).values()) * d * 2 * size


def kept_mask(model_or_config) -> torch.Tensor:
    """Bool tensor (layers, heads): True where the original head is still there."""
    n_layers, n_heads = model_shape(model_or_config)
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, heads in kept_heads(model_or_config).items():
        mask[layer, heads] = True
    return mask


def num_kept(model_or_config) -> int:
    return int(kept_mask(model_or_config).sum())


def normalize_heads(
    heads: Mapping[int, Iterable[int]] | torch.Tensor | np.ndarray, n_layers: int, n_heads: int
) -> dict[int, list[int]]:
    """Validate a head selection and return it as {layer: sorted unique heads}.

    Accepts a mapping layer -> heads, or a boolean (layers, heads) mask (True
    marks the heads meant). Raises HeadIndexError naming the bad index.
    """
    if isinstance(heads, (torch.Tensor, np.ndarray)):
        mask = torch.as_tensor(heads)
        if tuple(mask.shape) != (n_layers, n_heads):
            raise HeadIndexError(f"head mask has shape {tuple(mask.shape)}, expected ({n_layers}, {n_heads})")
        return {layer: torch.nonzero(mask[layer]).flatten().tolist() for layer in range(n_layers)}
    if not isinstance(heads, Mapping):
        raise HeadIndexError(
            f"heads must be a mapping {{layer: [heads]}} or a (layers, heads) mask, got {type(heads)}"
        )
    out: dict[int, list[int]] = {}
    for layer, hs in heads.items():
        try:
            layer_i = int(layer)
        except (TypeError, ValueError):
            raise HeadIndexError(f"layer index {layer!r} is not an integer") from None
        if not 0 <= layer_i < n_layers:
            raise HeadIndexError(f"layer {layer_i} does not exist: the model has layers 0..{n_layers - 1}")
        clean = set()
        for h in hs:
            if (
                isinstance(h, bool)
                or not isinstance(h, (int, np.integer))
                and not (isinstance(h, torch.Tensor) and h.numel() == 1 and not h.is_floating_point())
            ):
                raise HeadIndexError(f"head index {h!r} in layer {layer_i} is not an integer")
            h_i = int(h)
            if not 0 <= h_i < n_heads:
                raise HeadIndexError(
                    f"head {h_i} of layer {layer_i} does not exist: heads are numbered 0..{n_heads - 1}"
                )
            clean.add(h_i)
        out[layer_i] = sorted(set(out.get(layer_i, [])) | clean)
    return out


def mask_to_heads(mask: torch.Tensor) -> dict[int, list[int]]:
    """(layers, heads) bool mask -> {layer: [heads where True]} (every layer listed)."""
    return {layer: torch.nonzero(mask[layer]).flatten().tolist() for layer in range(mask.shape[0])}


def mean_relative_depth(mask: torch.Tensor) -> float:
    """Mean of layer/(layers-1) over kept heads: 0 = first layer, 1 = last.

    The proximity-bias measure: gradient rankings tend to keep heads near the
    output (values near 1).
    """
    n_layers = mask.shape[0]
    layers = torch.nonzero(mask)[:, 0].double()
    if layers.numel() == 0:
        return float("nan")
    return float((layers / max(n_layers - 1, 1)).mean())
