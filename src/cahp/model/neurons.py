"""Bookkeeping and gates of feed-forward (FFN) neurons.

Neuron ``(layer, i)`` is row ``i`` of a layer's intermediate projection
(hidden -> d_ff) and column ``i`` of its output projection (d_ff -> hidden),
numbered in the original architecture: ``0 <= i < d_ff``
(``config.intermediate_size``; DistilBERT: ``hidden_dim``), also after a model
was pruned twice. ``config.intermediate_size`` itself never changes.

The kept neurons are recorded in the model config under `KEPT_NEURONS_KEY`; a
config without the key has every FFN dense. The record is compact JSON::

    {"intermediate_size": 1536,
     "counts": [c_0, ..., c_{L-1}],
     "indices": ["0-3,7,9-1535", ..., ""]}

``counts[l]`` is the number of neurons layer ``l`` keeps; ``indices[l]`` lists
their original indices in ascending order, comma separated, a run of
consecutive indices written as an inclusive range ``a-b``; ``""`` is a layer
whose FFN is empty (residual, output bias and LayerNorm only). Standalone
loaders read this format: change it only with a new format version.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.gates import Gates

KEPT_NEURONS_KEY = "cahp_kept_neurons"
_TOKEN = re.compile(r"^(\d+)(?:-(\d+))?$")


class NeuronIndexError(ValueError):
    """A neuron or layer index that does not exist, or an impossible neuron selection."""


class NeuronRecordError(ValueError):
    """A malformed ``cahp_kept_neurons`` record (in a config or a checkpoint)."""


def neuron_shape(model_or_config) -> tuple[int, int]:
    """(layers, original neurons per FFN)."""
    config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(config)
    return adapter.num_layers(config), adapter.intermediate_size(config)


# --- the config record ----------------------------------------------------------


def _encode_layer(indices: list[int]) -> str:
    parts = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def encode_kept_neurons(kept: Mapping[int, Iterable[int]], intermediate_size: int, num_layers: int) -> dict:
    """The `KEPT_NEURONS_KEY` record of ``kept`` ({layer: original indices}, every layer 0..num_layers-1).

    Raises NeuronRecordError for a missing or unknown layer, or an index
    outside 0..intermediate_size-1 or repeated.
    """
    if isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int) or intermediate_size < 1:
        raise NeuronRecordError(f"intermediate_size must be a positive integer, got {intermediate_size!r}")
    layers = sorted(int(layer) for layer in kept)
    if layers != list(range(num_layers)):
        raise NeuronRecordError(f"kept neurons must list every layer 0..{num_layers - 1}, got layers {layers}")
    counts, indices = [], []
    for layer in range(num_layers):
        values = kept[layer] if layer in kept else kept[str(layer)]
        idx = sorted(int(i) for i in values)
        if len(set(idx)) != len(idx):
            raise NeuronRecordError(f"layer {layer} lists a neuron twice")
        if idx and not (idx[0] >= 0 and idx[-1] < intermediate_size):
            raise NeuronRecordError(
                f"layer {layer} lists neuron {idx[0] if idx[0] < 0 else idx[-1]}, "
                f"outside 0..{intermediate_size - 1}"
            )
        counts.append(len(idx))
        indices.append(_encode_layer(idx))
    return {"intermediate_size": intermediate_size, "counts": counts, "indices": indices}


def _decode_layer(text: str, layer: int, size: int) -> list[int]:
    if text == "":
        return []
    out: list[int] = []
    for token in text.split(","):
        match = _TOKEN.match(token.strip())
        if match is None:
            raise NeuronRecordError(f"layer {layer}: {token!r} is neither an index nor a range a-b")
        a = int(match.group(1))
        b = a if match.group(2) is None else int(match.group(2))
        if b < a:
            raise NeuronRecordError(f"layer {layer}: range {token!r} runs backwards")
        if out and a <= out[-1]:
            raise NeuronRecordError(f"layer {layer}: indices are not strictly ascending at {token!r}")
        if b >= size:
            raise NeuronRecordError(f"layer {layer}: neuron {b} is outside 0..{size - 1}")
        out.extend(range(a, b + 1))
    return out


def decode_kept_neurons(
    record, num_layers: int | None = None, intermediate_size: int | None = None
) -> dict[int, list[int]]:
    """{layer: ascending original indices} from a `KEPT_NEURONS_KEY` record.

    ``num_layers`` / ``intermediate_size``, when given (the architecture's),
    must match the record. Raises NeuronRecordError naming the problem.
    """
    if not isinstance(record, Mapping):
        raise NeuronRecordError(f"{KEPT_NEURONS_KEY} must be an object, got {type(record).__name__}")
    wanted = {"intermediate_size", "counts", "indices"}
    if set(record) != wanted:
        raise NeuronRecordError(
            f"{KEPT_NEURONS_KEY} must have exactly the keys {sorted(wanted)}, got {sorted(record)}"
        )
    size, counts, indices = record["intermediate_size"], record["counts"], record["indices"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise NeuronRecordError(f"{KEPT_NEURONS_KEY}.intermediate_size must be a positive integer, got {size!r}")
    if intermediate_size is not None and size != intermediate_size:
        raise NeuronRecordError(
            f"{KEPT_NEURONS_KEY}.intermediate_size is {size}, the architecture has {intermediate_size}"
        )
    if not isinstance(counts, list) or not isinstance(indices, list) or len(counts) != len(indices):
        raise NeuronRecordError(f"{KEPT_NEURONS_KEY}.counts and .indices must be lists of the same length")
    if num_layers is not None and len(counts) != num_layers:
        raise NeuronRecordError(f"{KEPT_NEURONS_KEY} lists {len(counts)} layers, the architecture has {num_layers}")
    out = {}
    for layer, (count, text) in enumerate(zip(counts, indices)):
        if not isinstance(text, str):
            raise NeuronRecordError(f"{KEPT_NEURONS_KEY}.indices[{layer}] must be a string, got {text!r}")
        idx = _decode_layer(text, layer, size)
        if isinstance(count, bool) or not isinstance(count, int) or count != len(idx):
            raise NeuronRecordError(
                f"{KEPT_NEURONS_KEY}.counts[{layer}] is {count!r} but its indices hold {len(idx)} neurons"
            )
        out[layer] = idx
    return out


def kept_neurons(model_or_config) -> dict[int, list[int]]:
    """Original indices of the FFN neurons each layer still holds (every layer listed)."""
    config = getattr(model_or_config, "config", model_or_config)
    n_layers, size = neuron_shape(config)
    record = getattr(config, KEPT_NEURONS_KEY, None)
    if record is None:
        return {layer: list(range(size)) for layer in range(n_layers)}
    return decode_kept_neurons(record, n_layers, size)


def kept_neuron_mask(model_or_config) -> torch.Tensor:
    """Bool tensor (layers, d_ff): True where the original neuron is still there."""
    n_layers, size = neuron_shape(model_or_config)
    mask = torch.zeros(n_layers, size, dtype=torch.bool)
    for layer, idx in kept_neurons(model_or_config).items():
        mask[layer, idx] = True
    return mask


def normalize_neurons(
    neurons: Mapping[int, Iterable[int]] | torch.Tensor | np.ndarray, n_layers: int, size: int
) -> dict[int, list[int]]:
    """Validate a neuron selection; returns {layer: sorted unique original indices}.

    Accepts a mapping layer -> neurons (ints, integer arrays or tensors) or a
    bool (layers, d_ff) mask (True marks the neurons meant). Raises
    NeuronIndexError naming the bad index.
    """
    if isinstance(neurons, (torch.Tensor, np.ndarray)):
        mask = torch.as_tensor(neurons)
        if mask.dtype != torch.bool or tuple(mask.shape) != (n_layers, size):
            raise NeuronIndexError(
                f"a neuron mask must be a bool tensor of shape ({n_layers}, {size}), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        return {layer: torch.nonzero(mask[layer]).flatten().tolist() for layer in range(n_layers)}
    if not isinstance(neurons, Mapping):
        raise NeuronIndexError(
            f"neurons must be a mapping {{layer: [neurons]}} or a (layers, d_ff) bool mask, got {type(neurons)}"
        )
    out: dict[int, list[int]] = {}
    for layer, values in neurons.items():
        try:
            layer_i = int(layer)
        except (TypeError, ValueError):
            raise NeuronIndexError(f"layer index {layer!r} is not an integer") from None
        if not 0 <= layer_i < n_layers:
            raise NeuronIndexError(f"layer {layer_i} does not exist: the model has layers 0..{n_layers - 1}")
        idx = _as_index_array(values, layer_i)
        if idx.size and not (idx.min() >= 0 and idx.max() < size):
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise NeuronIndexError(
                f"neuron {bad} of layer {layer_i} does not exist: neurons are numbered 0..{size - 1}"
            )
        out[layer_i] = sorted(set(out.get(layer_i, [])) | set(idx.tolist()))
    return out


def _as_index_array(values, layer: int) -> np.ndarray:
    """1-D int64 array of ``values``; NeuronIndexError for bools, floats or nesting."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.integer) or values.ndim > 1:
            raise NeuronIndexError(f"neurons of layer {layer} must be integers, got an array of {values.dtype}")
        return values.astype(np.int64).reshape(-1)
    items = list(values)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise NeuronIndexError(f"neuron index {v!r} in layer {layer} is not an integer")
    return np.asarray(items, dtype=np.int64)


# --- gates ---------------------------------------------------------------------


class NeuronGates(Gates):
    """Gates of shape (layers, d_ff) on the FFN neurons, attached through hooks.

    A gate g[l, i] multiplies neuron i's activation (its slice of the input of
    layer l's output projection) before that projection, the way `HeadGates`
    scales a head's context. So g = 0 gives exactly the model with that neuron
    removed, g = 1 changes nothing, and gradients reach the gates. Columns of
    removed neurons (and whole rows of empty FFNs) have no effect. Works
    alongside `HeadGates` (they hook different modules). Values, `set`,
    `close` and the context manager: `cahp.model.gates.Gates`.
    """

    shape_error = NeuronIndexError

    def __init__(self, model: nn.Module, init: float | torch.Tensor = 1.0, requires_grad: bool = False):
        adapter = get_adapter(model)
        kept = kept_neurons(model.config)
        # An empty FFN has no output projection: nothing to gate.
        outs = [adapter.ffn(layer).out for layer in adapter.layers(model)]
        targets = [(i, out, kept[i]) for i, out in enumerate(outs) if out is not None]
        super().__init__(model, neuron_shape(model.config), targets, init, requires_grad)

    def _make_hook(self, layer_idx: int, index: torch.Tensor):
        def hook(module, args):
            (x, *rest) = args
            # x: (..., d_kept) activations; one gate per kept neuron, broadcast over batch and tokens.
            g = self.values[layer_idx].index_select(0, index).to(x.dtype)
            return (x * g, *rest)

        return hook


@contextmanager
def neuron_gates(
    model: nn.Module, init: float | torch.Tensor = 1.0, requires_grad: bool = False
) -> Iterator[NeuronGates]:
    """Attach `NeuronGates` to ``model`` for the duration of a ``with`` block."""
    gates = NeuronGates(model, init=init, requires_grad=requires_grad)
    try:
        yield gates
    finally:
        gates.close()
