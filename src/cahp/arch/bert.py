"""BERT layout: BERT, MiniLM (a BERT), RoBERTa, ELECTRA.

encoder.layer[i].attention.self.{query,key,value} and
encoder.layer[i].attention.output.{dense,LayerNorm}; post-norm residual.
"""

from __future__ import annotations

from torch import nn

from .base import ArchAdapter, LayerHeads, ResidualOnlyAttention


class BertAdapter(ArchAdapter):
    name = "bert"
    model_types = ("bert", "roberta", "electra", "xlm-roberta", "camembert")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).encoder.layer)

    def heads(self, layer: nn.Module) -> LayerHeads:
        attn = layer.attention
        if isinstance(attn, ResidualOnlyAttention):
            return LayerHeads(None, None, None, None, None)
        s = attn.self
        return LayerHeads(s, s.query, s.key, s.value, attn.output.dense)

    def set_head_count(self, attention: nn.Module, n: int, head_dim: int) -> None:
        attention.num_attention_heads = n
        attention.all_head_size = n * head_dim

    def make_residual_only(self, layer: nn.Module, config) -> None:
        out = layer.attention.output
        layer.attention = ResidualOnlyAttention(
            out.dense.bias, out.LayerNorm, config.hidden_dropout_prob, style="post_norm"
        )
