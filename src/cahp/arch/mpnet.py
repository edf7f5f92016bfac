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

from .base import (
    ArchAdapter,
    LayerFFN,
    LayerHeads,
    ResidualOnlyAttention,
    check_kernel,
    drop_fused_weights,
    empty_post_norm_ffn,
    post_norm_ffn,
    project_out_residual,
    project_qkv,
    set_compact,
)


class PrunedMPNetSelfAttention(MPNetSelfAttention):
    """MPNet self-attention holding a subset of the original heads.

    ``head_index`` (non-persistent buffer, shape (h,)) holds the original
    indices of the heads this module keeps; they select the matching channels of
    the shared position bias.

    ``kernel`` is "sdpa" by default: torch's ``scaled_dot_product_attention``
    with the sliced position bias (plus the padding mask, if any) as its
    additive mask, one fused call instead of matmul, add, softmax and matmul.
    "eager" spells those steps out; asking for ``output_attentions`` always
    takes the eager path, since only it has the probabilities.

    The encoder builds the bias as (1, H, T, T) expanded over the batch, so it
    never differs between batch rows: the module slices its heads from one row
    (h x T x T values) rather than from the expanded (B, H, T, T) copy.
    `MPNetAdapter.set_attention_kernel` puts a dense model's modules into this
    class too (all heads), so dense and pruned run the same kernel.
    """

    kernel = "sdpa"

    def _bias(self, position_bias):
        if position_bias is None:
            return None
        bias = position_bias[:1]
        index = self._buffers["head_index"]
        if bias.shape[1] != index.shape[0]:
            bias = bias.index_select(1, index)
        return bias

    def attend(self, hidden_states, attention_mask=None, position_bias=None, fuse_qkv=False, residual=None):
        """The SDPA path: output projection of the attention context, (B, T, hidden).

        ``fuse_qkv``: q/k/v in one GEMM where nothing can tell (see `project_qkv`).
        ``residual``: returns ``residual + output`` instead, added inside the
        projection's GEMM where nothing can tell (see `project_out_residual`).
        """
        b, t = hidden_states.shape[:2]
        d = self.attention_head_size
        m = self._modules  # not Module.__getattr__: a Python fallback lookup on every access
        if fuse_qkv:
            q, k, v = project_qkv(self, m["q"], m["k"], m["v"], hidden_states, d)
        else:
            q, k, v = (m[n](hidden_states).view(b, t, -1, d).transpose(1, 2) for n in ("q", "k", "v"))
        mask = self._bias(position_bias)
        if attention_mask is not None:
            mask = attention_mask if mask is None else mask + attention_mask
        c = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.training else 0.0, scale=d**-0.5
        )
        c = c.transpose(1, 2).flatten(2)
        if residual is not None:
            return project_out_residual(m["o"], c, residual)
        return m["o"](c)

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        if self.kernel == "sdpa" and not output_attentions:
            return (self.attend(hidden_states, attention_mask, position_bias),)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        q = self.q(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v(hidden_states).view(hidden_shape).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        bias = self._bias(position_bias)
        if bias is not None:
            scores = scores + bias
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        c = torch.matmul(probs, v).transpose(1, 2).reshape(*input_shape, self.all_head_size)
        o = self.o(c)
        return (o, probs) if output_attentions else (o,)


def compact_mpnet_attention_forward(
    self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs
):
    """``MPNetAttention.forward`` in one step: q/k/v in one GEMM (see `project_qkv`), SDPA
    self-attention, residual added in the output projection's GEMM (see `project_out_residual`), LayerNorm."""
    m = self._modules
    a = m["attn"]
    if output_attentions or not isinstance(a, PrunedMPNetSelfAttention):
        return super(type(self), self).forward(
            hidden_states, attention_mask, position_bias, output_attentions=output_attentions, **kwargs
        )
    if self.training:  # dropout sits between the projection and the residual
        o = m["dropout"](a.attend(hidden_states, attention_mask, position_bias, fuse_qkv=True))
        return (m["LayerNorm"](o + hidden_states),)
    o = a.attend(hidden_states, attention_mask, position_bias, fuse_qkv=True, residual=hidden_states)
    return (m["LayerNorm"](o),)


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

    def ffn(self, layer: nn.Module) -> LayerFFN:
        return post_norm_ffn(layer)

    def make_ffn_empty(self, layer: nn.Module, config) -> None:
        empty_post_norm_ffn(layer, config)

    def set_head_count(self, attention: nn.Module, n: int, head_dim: int) -> None:
        attention.num_attention_heads = n
        attention.all_head_size = n * head_dim

    def set_head_index(self, attention: nn.Module, kept: list[int]) -> None:
        if not isinstance(attention, PrunedMPNetSelfAttention):
            attention.__class__ = PrunedMPNetSelfAttention  # same state, forward that slices the bias
        index = torch.tensor(kept, dtype=torch.long, device=attention.q.weight.device)
        attention.register_buffer("head_index", index, persistent=False)

    def compact_block(self, layer: nn.Module) -> nn.Module | None:
        return None if isinstance(layer.attention, ResidualOnlyAttention) else layer.attention

    compact_forward = compact_mpnet_attention_forward

    def set_attention_kernel(self, model: nn.Module, kernel: str) -> None:
        """MPNet has no sdpa in transformers: here "sdpa" and "compact" put every
        self-attention module into `PrunedMPNetSelfAttention` (all heads on a dense
        layer) with torch's SDPA; "compact" also shortens the block around it.
        "eager" runs the explicit softmax path."""
        check_kernel(kernel)
        for layer in self.layers(model):
            block = self.compact_block(layer)
            if block is None:
                continue
            attention = block.attn
            if kernel != "eager" and not isinstance(attention, PrunedMPNetSelfAttention):
                # Surgery always converts the class, so this module still has every head.
                self.set_head_index(attention, list(range(attention.num_attention_heads)))
            if isinstance(attention, PrunedMPNetSelfAttention):
                attention.kernel = "eager" if kernel == "eager" else "sdpa"
            set_compact(block, compact_mpnet_attention_forward if kernel == "compact" else None)
        if kernel != "compact":
            drop_fused_weights(model)

    def make_residual_only(self, layer: nn.Module, config) -> None:
        block = layer.attention
        layer.attention = ResidualOnlyAttention(
            block.attn.o.bias, block.LayerNorm, config.hidden_dropout_prob, style="mpnet"
        ).train(block.training)

    def extra_scores(self, model: nn.Module, seq_len: int) -> torch.Tensor:
        enc = self.base_model(model).encoder
        device = enc.relative_attention_bias.weight.device
        pos = torch.arange(seq_len, device=device)
        bucket = enc.relative_position_bucket(pos[None, :] - pos[:, None])
        # (T, T, H) -> (1, H, T, T), as MPNetEncoder.compute_position_bias builds it.
        return enc.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)

    def max_positions(self, config) -> int:
        """MPNet numbers positions from ``pad_token_id + 1`` (as RoBERTa does): that many fewer tokens fit."""
        return super().max_positions(config) - (config.pad_token_id or 0) - 1
