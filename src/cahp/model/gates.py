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


class HeadGates:
    """Gates of shape (layers, heads) attached to a model through hooks.

    Use as a context manager (``with head_gates(model) as gates:``) or call
    `close()`; either way no hook is left behind.

    Attributes:
        values: float tensor (layers, heads); assign into it (``gates.values[2, 5] = 0``)
            or replace it with `set`. Has ``requires_grad`` when asked for.
    """

    def __init__(self, model: nn.Module, init: float | torch.Tensor = 1.0, requires_grad: bool = False):
        self.model = model
        adapter = get_adapter(model)
        n_layers, n_heads = model_shape(model.config)
        self.head_dim = adapter.head_dim(model.config)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        if isinstance(init, torch.Tensor):
            values = init.detach().to(device=device, dtype=dtype).clone()
            if tuple(values.shape) != (n_layers, n_heads):
                raise ValueError(
                    f"gate values have shape {tuple(values.shape)}, expected ({n_layers}, {n_heads})"
                )
        else:
            values = torch.full((n_layers, n_heads), float(init), device=device, dtype=dtype)
        self.values = values.requires_grad_(requires_grad)
        self._handles = []
        kept = kept_heads(model.config)
        for layer_idx, layer in enumerate(adapter.layers(model)):
            o = adapter.heads(layer).o
            if o is None:  # no head left in this layer: nothing to gate
                continue
            index = torch.tensor(kept[layer_idx], dtype=torch.long, device=device)
            self._handles.append(o.register_forward_pre_hook(self._make_hook(layer_idx, index)))

    def _make_hook(self, layer_idx: int, index: torch.Tensor):
        d = self.head_dim

        def hook(module, args):
            (x, *rest) = args
            # x: (..., h_kept * d) -> (..., h_kept, d), scaled per head.
            g = self.values[layer_idx].index_select(0, index).to(x.dtype)
            x = (x.unflatten(-1, (-1, d)) * g[:, None]).flatten(-2)
            return (x, *rest)

        return hook

    def set(self, values: torch.Tensor) -> None:
        """Copy new gate values in (e.g. a 0/1 mask of a head selection)."""
        with torch.no_grad():
            self.values.copy_(torch.as_tensor(values, dtype=self.values.dtype))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> HeadGates:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
