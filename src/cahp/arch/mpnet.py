"""MPNet layout: encoder.layer[i].attention.attn.{q,k,v,o}.

MPNet adds one relative position bias, an embedding of shape (buckets, heads)
owned by the encoder and shared by every layer, to the attention scores. After
uneven pruning each layer keeps different heads, so each pruned attention
module carries the original indices of its heads and slices the shared bias
with them. The shared table itself stays whole (32 x heads parameters): a
column is still needed while any layer keeps that head.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

from .base import ArchAdapter, LayerHeads, ResidualOnlyAttention


class PrunedMPNetSelfAttention(MPNetSelfAttention):
    """MPNet self-attention holding a subset of the original heads.

    ``head_index`` (non-persistent buffer, shape (h,)) holds the original
    indices of the heads this module keeps; they select the matching channels of
    the shared position bias (B or 1, H_orig, T, T).
    """

    def forward(
        self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs
    ):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        q = self.q(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v(hidden_states).view(hidden_shape).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if position_bias is not None:
            if position_bias.shape[1] != self.head_index.numel():
                position_bias = position_bias.index_select(1, self.head_index)
            scores = scores + position_bias
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        c = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(*input_shape, self.all_head_size)
        o = self.o(c)
        return (o, probs) if output_attentions else (o,)


class MPNetAdapter(ArchAdapter):
    name = "mpnet"
    model_types = ("mpnet",)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).encoder.layer)

    def heads(self, layer: nn.Module) -> LayerHeads:
        block = layer.attention
        if isinstance(block, ResidualOnlyAttention):
            return LayerHeads(None, None, None, None, None)
        a = block.attn
        return LayerHeads(a, a.q, a.k, a.v, a.o)

    def set_head_count(self, attention: nn.Module, n: int, head_dim: int) -> None:
        attention.num_attention_heads = n
        attention.all_head_size = n * head_dim

    def set_head_index(self, attention: nn.Module, kept: list[int]) -> None:
        if not isinstance(attention, PrunedMPNetSelfAttention):
            attention.__class__ = PrunedMPNetSelfAttention  # same state, forward that slices the bias
        index = torch.tensor(kept, dtype=torch.long, device=attention.q.weight.device)
        attention.register_buffer("head_index", index, persistent=False)

    def make_residual_only(self, layer: nn.Module, config) -> None:
        block = layer.attention
        layer.attention = ResidualOnlyAttention(
            block.attn.o.bias, block.LayerNorm, config.hidden_dropout_prob, style="mpnet"
        )

    def extra_scores(self, model: nn.Module, seq_len: int) -> torch.Tensor:
        enc = self.base_model(model).encoder
        device = enc.relative_attention_bias.weight.device
        pos = torch.arange(seq_len, device=device)
        bucket = enc.relative_position_bucket(pos[None, :] - pos[:, None])
        # (T, T, H) -> (1, H, T, T), as MPNetEncoder.compute_position_bias builds it.
        return enc.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)
