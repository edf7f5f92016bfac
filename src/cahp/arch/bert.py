"""BERT layout: BERT, MiniLM (a BERT), RoBERTa, ELECTRA.

encoder.layer[i].attention.self.{query,key,value} and
encoder.layer[i].attention.output.{dense,LayerNorm}; post-norm residual.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from .base import (
    ArchAdapter,
    LayerFFN,
    LayerHeads,
    ResidualOnlyAttention,
    empty_post_norm_ffn,
    post_norm_ffn,
    project_out_residual,
    project_qkv,
)


def compact_bert_attention_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """``XAttention.forward`` in a few tensor calls: q/k/v (one GEMM, see `project_qkv`), torch SDPA,
    output projection with bias and residual in its GEMM (see `project_out_residual`), LayerNorm.

    Same result as transformers' sdpa path for an encoder's self-attention;
    anything else (cross-attention, caches, asked-for attention weights) goes
    to the original forward. Submodules are read from ``_modules`` directly:
    ``Module.__getattr__`` is a Python fallback lookup on every access, on every call.
    """
    if (
        args
        or getattr(self, "is_cross_attention", False)
        or kwargs.get("output_attentions")
        or any(kwargs.get(k) is not None for k in _NOT_COMPACT)
    ):
        return super(type(self), self).forward(hidden_states, attention_mask, *args, **kwargs)
    s = self._modules["self"]
    out = self._modules["output"]
    sm = s._modules
    q, k, v = project_qkv(s, sm["query"], sm["key"], sm["value"], hidden_states, s.attention_head_size)
    c = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask, dropout_p=s.dropout.p if self.training else 0.0, scale=s.scaling
    )
    om = out._modules
    c = c.transpose(1, 2).flatten(2)
    if self.training:
        return om["LayerNorm"](om["dropout"](om["dense"](c)) + hidden_states), None
    return om["LayerNorm"](project_out_residual(om["dense"], c, hidden_states)), None


_NOT_COMPACT = ("encoder_hidden_states", "cache", "past_key_values", "past_key_value")


class BertAdapter(ArchAdapter):
    name = "bert"
    model_types = ("bert", "roberta", "electra", "xlm-roberta", "camembert")
    compact_forward = compact_bert_attention_forward

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).encoder.layer)

    def heads(self, layer: nn.Module) -> LayerHeads:
        attn = layer.attention
        if isinstance(attn, ResidualOnlyAttention):
            return LayerHeads(None, None, None, None, None)
        s = attn.self
        return LayerHeads(s, s.query, s.key, s.value, attn.output.dense)

    def ffn(self, layer: nn.Module) -> LayerFFN:
        return post_norm_ffn(layer)

    def make_ffn_empty(self, layer: nn.Module, config) -> None:
        empty_post_norm_ffn(layer, config)

    def compact_block(self, layer: nn.Module) -> nn.Module | None:
        return None if isinstance(layer.attention, ResidualOnlyAttention) else layer.attention

    def set_head_count(self, attention: nn.Module, n: int, head_dim: int) -> None:
        attention.num_attention_heads = n
        attention.all_head_size = n * head_dim

    def make_residual_only(self, layer: nn.Module, config) -> None:
        old = layer.attention
        out = old.output
        # A new module starts in training mode: follow the block it replaces (no dropout in eval).
        layer.attention = ResidualOnlyAttention(
            out.dense.bias, out.LayerNorm, config.hidden_dropout_prob, style="post_norm"
        ).train(old.training)

    uses_token_type_ids = True  # BERT, RoBERTa, ELECTRA, XLM-R and CamemBERT all take segment ids

    def max_positions(self, config) -> int:
        """RoBERTa-style families number positions from ``pad_token_id + 1``: that many fewer tokens fit."""
        n = super().max_positions(config)
        if config.model_type in ("roberta", "xlm-roberta", "camembert"):
            n -= (config.pad_token_id or 0) + 1
        return n
