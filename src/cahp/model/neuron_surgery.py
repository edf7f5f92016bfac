"""Physical removal of FFN neurons: narrower feed-forward blocks, less compute.

`remove_neurons` slices the rows of a layer's intermediate projection and the
columns of its output projection that belong to the removed neurons; layers may
end up with different widths. A layer left with no neuron has its FFN replaced
by `cahp.arch.ResidualOnlyFFN` (residual, output bias, LayerNorm): no FFN
matmul at all. The kept neurons are written to the config (see
`cahp.model.neurons`), so a model can be pruned again in original numbering and
reloaded with `cahp.load_pruned`. Heads and neurons are independent: either
surgery may come first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.neurons import (
    KEPT_NEURONS_KEY,
    NeuronIndexError,
    encode_kept_neurons,
    kept_neurons,
    neuron_shape,
    normalize_neurons,
)
from cahp.model.surgery import _owner_of, _replace_child, _slice_linear

log = logging.getLogger(__name__)


def remove_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int]] | torch.Tensor) -> nn.Module:
    """Remove FFN neurons from ``model`` in place and return it.

    Args:
        model: a supported Hugging Face model (dense or already pruned).
        neurons: ``{layer: [neuron, ...]}`` in original numbering, or a bool
            (layers, d_ff) mask with True on the neurons to remove. Uneven
            layers are fine, and so is every neuron of a layer (even of every
            layer: the residual path then carries the whole block).

    Raises:
        NeuronIndexError: a layer or neuron that does not exist, or a neuron
            that was already removed.
    """
    adapter = get_adapter(model)
    config = model.config
    n_layers, size = neuron_shape(config)
    remove = normalize_neurons(neurons, n_layers, size)
    current = kept_neurons(config)
    for layer, idx in remove.items():
        gone = sorted(set(idx) - set(current[layer]))
        if gone:
            shown = ", ".join(map(str, gone[:5])) + (", ..." if len(gone) > 5 else "")
            raise NeuronIndexError(f"neurons {shown} of layer {layer} were already removed")

    new_kept = {}
    layers = adapter.layers(model)
    for layer in range(n_layers):
        drop = set(remove.get(layer, ()))
        new_kept[layer] = [i for i in current[layer] if i not in drop]
        if not drop:
            continue
        if not new_kept[layer]:
            adapter.make_ffn_empty(layers[layer], config)
            continue
        ffn = adapter.ffn(layers[layer])
        # Positions of the surviving neurons inside the layer's current (possibly pruned) weights.
        pos = {i: p for p, i in enumerate(current[layer])}
        index = torch.tensor([pos[i] for i in new_kept[layer]], dtype=torch.long)
        _replace_module(layers[layer], ffn.inter, _slice_linear(ffn.inter, index, dim=0))  # rows: d_ff outputs
        if ffn.up is not None:  # gated MLPs (Llama): the up projection's rows go with the gate's
            _replace_module(layers[layer], ffn.up, _slice_linear(ffn.up, index, dim=0))
        _replace_module(layers[layer], ffn.out, _slice_linear(ffn.out, index, dim=1))  # columns: d_ff inputs

    setattr(config, KEPT_NEURONS_KEY, encode_kept_neurons(new_kept, size, n_layers))
    log.debug("kept neurons per layer after surgery: %s", [len(v) for v in new_kept.values()])
    return model


def keep_neurons(model: nn.Module, neurons: Mapping[int, Iterable[int]] | torch.Tensor) -> nn.Module:
    """Remove every FFN neuron except ``neurons`` (original numbering, or a bool mask of kept neurons).

    A layer missing from the mapping keeps no neuron.
    """
    n_layers, size = neuron_shape(model.config)
    keep = normalize_neurons(neurons, n_layers, size)
    current = kept_neurons(model.config)
    missing = {layer: sorted(set(idx) - set(current[layer])) for layer, idx in keep.items()}
    missing = {layer: idx[:5] for layer, idx in missing.items() if idx}
    if missing:
        raise NeuronIndexError(f"cannot keep neurons that were already removed: {missing}")
    remove = {layer: sorted(set(current[layer]) - set(keep.get(layer, ()))) for layer in current}
    return remove_neurons(model, remove)


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` sits under ``root`` (same attribute name of the same parent)."""
    _replace_child(_owner_of(root, old), old, new, "FFN")


__all__ = ["keep_neurons", "remove_neurons"]
