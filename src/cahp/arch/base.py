"""What every architecture adapter says about a model: where its heads live.

An adapter never changes a model by itself; `cahp.surgery`, `cahp.gates` and
`cahp.capture` ask it for modules and act on them. That keeps the knowledge of
one model family in one small file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerHeads:
    """The modules that hold one layer's attention heads.

    q/k/v map hidden -> heads*head_dim (rows grouped by head); o maps
    heads*head_dim -> hidden (columns grouped by head). ``attention`` is the
    self-attention module whose head-count attributes must follow surgery.
    All are None for a layer whose heads were all removed.
    """

    attention: nn.Module | None
    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    o: nn.Linear | None


class ResidualOnlyAttention(nn.Module):
    """Stands in for an attention block whose every head was removed.

    With no head left, the block's output projection contributes only its bias,
    so the block reduces to ``post(hidden + dropout(bias))``: no projection, no
    softmax, no attention work at all. ``style`` reproduces the calling
    convention of the module it replaces:

    - ``"post_norm"`` (BERT/RoBERTa/ELECTRA ``XAttention``): returns
      ``(LayerNorm(h + b), None)``.
    - ``"mpnet"`` (``MPNetAttention``): returns ``(LayerNorm(h + b),)`` plus a
      ``None`` attention entry when ``output_attentions`` is asked for.
    - ``"bias_only"`` (DistilBERT self-attention, whose LayerNorm lives in the
      block): returns ``(b broadcast to h, None)``.
    """

    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm | None, dropout_p: float, style: str):
        super().__init__()
        if style not in ("post_norm", "mpnet", "bias_only"):
            raise ValueError(f"unknown residual-only style {style!r}")
        self.style = style
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = layer_norm
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.training and self.dropout.p > 0:
            # Dropout acted element-wise on the broadcast bias in the original block.
            added = self.dropout(self.bias.expand_as(hidden_states))
        else:
            added = self.bias
        if self.style == "bias_only":
            return added.expand_as(hidden_states), None
        out = self.LayerNorm(hidden_states + added)
        if self.style == "mpnet":
            return (out, None) if kwargs.get("output_attentions", False) else (out,)
        return out, None


class ArchAdapter:
    """Base class: subclasses describe one model family.

    Attributes:
        name: family name for messages.
        model_types: ``config.model_type`` values this adapter handles.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()

    # --- configuration -------------------------------------------------
    def num_layers(self, config) -> int:
        return config.num_hidden_layers

    def num_heads(self, config) -> int:
        """Heads per layer of the original (unpruned) architecture."""
        return config.num_attention_heads

    def hidden_size(self, config) -> int:
        return config.hidden_size

    def head_dim(self, config) -> int:
        return self.hidden_size(config) // self.num_heads(config)

    # --- modules --------------------------------------------------------
    def base_model(self, model: nn.Module) -> nn.Module:
        """The encoder model inside a task model (``model.bert`` etc.)."""
        return getattr(model, model.base_model_prefix, model)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def heads(self, layer: nn.Module) -> LayerHeads:
        raise NotImplementedError

    def set_head_count(self, attention: nn.Module, n: int, head_dim: int) -> None:
        """Update the head-count attributes the attention forward reads."""
        raise NotImplementedError

    def make_residual_only(self, layer: nn.Module, config) -> None:
        """Replace ``layer``'s attention block by a `ResidualOnlyAttention`."""
        raise NotImplementedError

    def set_head_index(self, attention: nn.Module, kept: list[int]) -> None:
        """Tell an attention module which original heads it holds.

        Only families with per-head tensors outside q/k/v/o (MPNet's shared
        relative position bias) need this; the default does nothing.
        """

    def extra_scores(self, model: nn.Module, seq_len: int) -> torch.Tensor | None:
        """Additive attention-score terms shared by all layers, if any.

        Returns a tensor of shape (1, H_orig, T, T) to add to q k^T * scale
        before the mask (MPNet's relative position bias), or None.
        """
        return None
