"""Physical head removal: smaller weights, less compute.

`remove_heads` slices the rows of the query/key/value projections and the
columns of the output projection that belong to the removed heads. A layer left
with no head has its attention block replaced by `ResidualOnlyAttention`
(residual path plus output bias, then the block's LayerNorm): it does no
attention work at all. The kept heads are written to the config (see
`cahp.model.heads`), so a model can be pruned again with original head numbers and
reloaded with `cahp.load_pruned`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.heads import KEPT_HEADS_KEY, HeadIndexError, kept_heads, kv_head_of, model_shape, normalize_heads

log = logging.getLogger(__name__)


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """New Linear keeping ``index`` along weight dim 0 (outputs) or 1 (inputs)."""
    w = linear.weight.detach().index_select(dim, index.to(linear.weight.device)).contiguous()
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            b = linear.bias.detach()
            new.bias.copy_(b.index_select(0, index.to(b.device)) if dim == 0 else b)
    new.train(linear.training)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _rows(heads: list[int], d: int) -> torch.Tensor:
    """Indices of the ``d`` consecutive rows (or columns) of each head position in ``heads``."""
    return torch.tensor([p * d + j for p in heads for j in range(d)], dtype=torch.long)


def remove_heads(model: nn.Module, heads: Mapping[int, Iterable[int]] | torch.Tensor) -> nn.Module:
    """Remove attention heads from ``model`` in place and return it.

    Args:
        model: a supported Hugging Face model (dense or already pruned).
        heads: ``{layer: [head, ...]}`` in original head numbering, or a bool
            (layers, heads) mask with True on the heads to remove. Uneven
            layers are fine, and so is every head of a layer. With
            grouped-query attention these are query heads: a key/value head
            goes with the last query head of its group, and the query heads
            left in a group keep reading it (groups may become uneven).

    Raises:
        HeadIndexError: a layer or head that does not exist, a head that was
            already removed, or a selection that removes every head of the model.
    """
    adapter = get_adapter(model)
    config = model.config
    n_layers, n_heads = model_shape(config)
    d = adapter.head_dim(config)
    remove = normalize_heads(heads, n_layers, n_heads)
    current = kept_heads(config)

    for layer, hs in remove.items():
        gone = sorted(set(hs) - set(current[layer]))
        if gone:
            raise HeadIndexError(f"heads {gone} of layer {layer} were already removed")
    new_kept = {
        layer: [h for h in current[layer] if h not in set(remove.get(layer, ()))] for layer in current
    }
    if sum(len(v) for v in new_kept.values()) == 0:
        raise HeadIndexError(
            "this would remove every attention head of the model; keep at least one head "
            "(a model with no attention at all cannot use its context)"
        )

    kv_of = kv_head_of(config)  # query head -> its key/value head (the identity without grouped-query attention)
    layers = adapter.layers(model)
    for layer, hs in sorted(remove.items()):
        if not hs:
            continue
        keep = new_kept[layer]
        if not keep:
            adapter.make_residual_only(layers[layer], config)
            continue
        lh = adapter.heads(layers[layer])
        # Positions of the surviving heads inside the layer's current (possibly pruned) weights: query heads
        # for q and o; key/value heads for k and v, where a key/value head stays while one of its queries does.
        pos = [current[layer].index(h) for h in keep]
        kv_now = sorted({kv_of[h] for h in current[layer]})
        kv_keep = sorted({kv_of[h] for h in keep})
        idx = _rows(pos, d)
        kv_idx = _rows([kv_now.index(g) for g in kv_keep], d)
        attn = lh.attention
        for name, proj, rows in (("q", lh.q, idx), ("k", lh.k, kv_idx), ("v", lh.v, kv_idx)):
            _replace_child(attn, proj, _slice_linear(proj, rows, dim=0), name)
        owner = _owner_of(layers[layer], lh.o)
        _replace_child(owner, lh.o, _slice_linear(lh.o, idx, dim=1), "o")
        adapter.set_head_count(attn, len(keep), d)
        adapter.set_kv_index(attn, [kv_keep.index(kv_of[h]) for h in keep])
        adapter.set_head_index(attn, keep)

    setattr(config, KEPT_HEADS_KEY, {str(layer): heads for layer, heads in sorted(new_kept.items())})
    log.debug("kept heads after surgery: %s", new_kept)
    return model


def keep_heads(model: nn.Module, heads: Mapping[int, Iterable[int]] | torch.Tensor) -> nn.Module:
    """Remove every head except ``heads`` (original numbering, or a bool mask of kept heads)."""
    n_layers, n_heads = model_shape(model.config)
    keep = normalize_heads(heads, n_layers, n_heads)
    current = kept_heads(model.config)
    missing = {layer: sorted(set(hs) - set(current[layer])) for layer, hs in keep.items()}
    missing = {layer: hs for layer, hs in missing.items() if hs}
    if missing:
        raise HeadIndexError(f"cannot keep heads that were already removed: {missing}")
    remove = {layer: [h for h in current[layer] if h not in set(keep.get(layer, ()))] for layer in current}
    return remove_heads(model, remove)


def _owner_of(root: nn.Module, child: nn.Module) -> nn.Module:
    for module in root.modules():
        for sub in module.children():
            if sub is child:
                return module
    raise RuntimeError("module not found under its layer")  # adapter bug, not user input


def _replace_child(parent: nn.Module, old: nn.Module, new: nn.Module, what: str) -> None:
    for name, sub in parent.named_children():
        if sub is old:
            setattr(parent, name, new)
            return
    raise RuntimeError(f"{what} projection not found in its parent module")  # adapter bug, not user input


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
