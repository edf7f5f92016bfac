"""DistilBERT layout: transformer.layer[i].attention.{q_lin,k_lin,v_lin,out_lin}.

The block's LayerNorm (sa_layer_norm) sits outside the attention module, so an
attention module with no head left returns only the output bias.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from .base import ArchAdapter, LayerFFN, LayerHeads, ResidualOnlyAttention, ResidualOnlyFFN, project_qkv


def compact_distilbert_attention_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """``DistilBertSelfAttention.forward`` in a few tensor calls (q/k/v in one GEMM, torch SDPA);
    asked-for weights go to the original forward."""
    if args or kwargs.get("output_attentions"):
        return super(type(self), self).forward(hidden_states, attention_mask, *args, **kwargs)
    m = self._modules  # not Module.__getattr__: a Python fallback lookup on every access
    q, k, v = project_qkv(self, m["q_lin"], m["k_lin"], m["v_lin"], hidden_states, self.attention_head_size)
    c = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scaling
    )
    return m["out_lin"](c.transpose(1, 2).flatten(2)), None


class DistilBertAdapter(ArchAdapter):
    name = "distilbert"
    model_types = ("distilbert",)
    compact_forward = compact_distilbert_attention_forward

    def num_layers(self, config) -> int:
        return config.n_layers

    def num_heads(self, config) -> int:
        return config.n_heads

    def hidden_size(self, config) -> int:
        return config.dim

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).transformer.layer)

    def intermediate_size(self, config) -> int:
        return config.hidden_dim

    def ffn(self, layer: nn.Module) -> LayerFFN:
        f = layer.ffn
        if isinstance(f, ResidualOnlyFFN):
            return LayerFFN(None, None, None)
        return LayerFFN(f.lin1, f.lin2, f.activation)

    def make_ffn_empty(self, layer: nn.Module, config) -> None:
        old = layer.ffn
        # TransformerBlock adds the FFN output to its input before output_layer_norm: return the bias only.
        layer.ffn = ResidualOnlyFFN(old.lin2.bias, None, old.dropout.p, style="bias_only").train(old.training)

    def heads(self, layer: nn.Module) -> LayerHeads:
        a = layer.attention
        if isinstance(a, ResidualOnlyAttention):
            return LayerHeads(None, None, None, None, None)
        return LayerHeads(a, a.q_lin, a.k_lin, a.v_lin, a.out_lin)

    def compact_block(self, layer: nn.Module) -> nn.Module | None:
        return None if isinstance(layer.attention, ResidualOnlyAttention) else layer.attention

    def set_head_count(self, attention: nn.Module, n: int, head_dim: int) -> None:
        attention.n_heads = n

    def make_residual_only(self, layer: nn.Module, config) -> None:
        old = layer.attention
        layer.attention = ResidualOnlyAttention(old.out_lin.bias, None, 0.0, style="bias_only").train(old.training)
