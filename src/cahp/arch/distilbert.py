"""DistilBERT layout: transformer.layer[i].attention.{q_lin,k_lin,v_lin,out_lin}.

The block's LayerNorm (sa_layer_norm) sits outside the attention module, so an
attention module with no head left returns only the output bias.
"""

from __future__ import annotations

from torch import nn

from .base import ArchAdapter, LayerHeads, ResidualOnlyAttention


class DistilBertAdapter(ArchAdapter):
    name = "distilbert"
    model_types = ("distilbert",)

    def num_layers(self, config) -> int:
        return config.n_layers

    def num_heads(self, config) -> int:
        return config.n_heads

    def hidden_size(self, config) -> int:
        return config.dim

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).transformer.layer)

    def heads(self, layer: nn.Module) -> LayerHeads:
        a = layer.attention
        if isinstance(a, ResidualOnlyAttention):
            return LayerHeads(None, None, None, None, None)
        return LayerHeads(a, a.q_lin, a.k_lin, a.v_lin, a.out_lin)

    def set_head_count(self, attention: nn.Module, n: int, head_dim: int) -> None:
        attention.n_heads = n

    def make_residual_only(self, layer: nn.Module, config) -> None:
        layer.attention = ResidualOnlyAttention(layer.attention.out_lin.bias, None, 0.0, style="bias_only")
