"""Differentiable head gates through forward pre-hooks.

A gate g[l, h] multiplies head h's context vector (its slice of the input of
layer l's output projection) before the projection. So g = 0 gives exactly the
model with that head removed (the projection then adds only its bias, like
`remove_heads` leaves it), g = 1 changes nothing, and values in between scale
the head. The gates sit after the attention kernel, so eager, sdpa or any other
attention implementation behaves the same, and gradients reach them.

Gates are indexed by original head numbers; on a pruned model the gates of
removed heads have no effect.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.heads import kept_heads, model_shape


class Gates:
    """A float tensor of gates (layers, units) applied by one forward pre-hook per layer.

    The base of `HeadGates` and `cahp.model.neurons.NeuronGates`: a subclass names
    the module each layer's gates scale the input of and how (`_make_hook`); this
    class owns the values, the hooks and their removal. Use as a context manager
    or call `close()`; either way no hook is left behind.

    Attributes:
        values: float tensor (layers, units) in original numbering; assign into it
            (``gates.values[2, 5] = 0``) or replace its content with `set`. Has
            ``requires_grad`` when asked for.
    """

    #: the error raised for gate values of the wrong shape
    shape_error: type[ValueError] = ValueError

    def __init__(self, model: nn.Module, shape: tuple[int, int], targets, init: float | torch.Tensor,
                 requires_grad: bool):
        """``targets``: (layer index, module whose input is gated, kept original indices) per gated layer."""
        self.model = model
        param = next(model.parameters())
        if isinstance(init, torch.Tensor):
            values = init.detach().to(device=param.device, dtype=param.dtype).clone()
            if tuple(values.shape) != tuple(shape):
                raise self.shape_error(f"gate values have shape {tuple(values.shape)}, expected {tuple(shape)}")
        else:
            values = torch.full(tuple(shape), float(init), device=param.device, dtype=param.dtype)
        self.values = values.requires_grad_(requires_grad)
        self._handles = []
        for layer_idx, module, kept in targets:
            index = torch.tensor(kept, dtype=torch.long, device=param.device)
            self._handles.append(module.register_forward_pre_hook(self._make_hook(layer_idx, index)))

    def _make_hook(self, layer_idx: int, index: torch.Tensor):
        """The pre-hook of layer ``layer_idx``; ``index``: (kept,) original indices of its units."""
        raise NotImplementedError

    def set(self, values: torch.Tensor) -> None:
        """Copy new gate values in (e.g. a 0/1 mask of a selection)."""
        with torch.no_grad():
            self.values.copy_(torch.as_tensor(values, dtype=self.values.dtype))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HeadGates(Gates):
    """Gates of shape (layers, heads) on the heads' context vectors (see the module docstring)."""

    def __init__(self, model: nn.Module, init: float | torch.Tensor = 1.0, requires_grad: bool = False):
        adapter = get_adapter(model)
        self.head_dim = adapter.head_dim(model.config)
        kept = kept_heads(model.config)
        # A layer with no head left has no output projection: nothing to gate.
        outs = [adapter.heads(layer).o for layer in adapter.layers(model)]
        targets = [(i, o, kept[i]) for i, o in enumerate(outs) if o is not None]
        super().__init__(model, model_shape(model.config), targets, init, requires_grad)

    def _make_hook(self, layer_idx: int, index: torch.Tensor):
        d = self.head_dim

        def hook(module, args):
            (x, *rest) = args
            # x: (..., h_kept * d) -> (..., h_kept, d), scaled per head.
            g = self.values[layer_idx].index_select(0, index).to(x.dtype)
            x = (x.unflatten(-1, (-1, d)) * g[:, None]).flatten(-2)
            return (x, *rest)

        return hook


@contextmanager
def head_gates(
    model: nn.Module, init: float | torch.Tensor = 1.0, requires_grad: bool = False
) -> Iterator[HeadGates]:
    """Attach `HeadGates` to ``model`` for the duration of a ``with`` block."""
    gates = HeadGates(model, init=init, requires_grad=requires_grad)
    try:
        yield gates
    finally:
        gates.close()
