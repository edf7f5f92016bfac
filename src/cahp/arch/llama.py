"""Llama layout (also Qwen2 and Mistral): model.layers[i].self_attn.{q,k,v,o}_proj, pre-norm decoder.

The same decoder under any task head: ``LlamaForCausalLM`` and
``LlamaForSequenceClassification`` (a decoder pruned as a classifier, see
`cahp.pipelines.decoder`) both hold it as ``model.model`` (their
``base_model_prefix``), so heads, KV groups, rotary embeddings, gates and
surgery are found the same way in both; the classifier's ``score`` head reads
the last non-pad token and has no per-head part.

Grouped-query attention: ``num_attention_heads`` query heads share
``num_key_value_heads`` key/value heads, query head ``h`` reading key/value
head ``h // (num_attention_heads // num_key_value_heads)`` (transformers'
``repeat_kv`` repeats each key/value head for consecutive query heads). Head
numbers in cahp are query heads; `kv_head_of` gives the group of each.

After surgery a layer's groups may be uneven (some query heads of a group
removed, the key/value head kept for the others). Such an attention module
gets `gqa_attention_forward`: it caches only the kept key/value heads (the KV
cache shrinks with them) and gives each kept query head its own key/value
head through an index map, instead of ``repeat_kv``'s uniform repeat. RoPE is
applied per head and never changes. A layer with no query head left gets
`HeadlessAttention`: Llama's ``o_proj`` has no bias, so the block adds exactly
zero (its bias, if a checkpoint has one) to the residual stream.

FFN neurons: Llama's MLP is ``down_proj(act(gate_proj(x)) * up_proj(x))``.
Neuron ``i`` is row ``i`` of ``gate_proj`` (`LayerFFN.inter`) and of
``up_proj`` (`LayerFFN.up`) and column ``i`` of ``down_proj`` (`LayerFFN.out`).
`LayerFFN.act` is ``act_fn``, whose output is ``act(gate)``, not the product
``act(gate) * up`` that ``down_proj`` reads: scaling it scales the neuron
exactly (the product is linear in each factor), but statistics that read it
see the gate factor only. Neuron gates hook ``down_proj``'s input, the product.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .base import ArchAdapter, LayerFFN, LayerHeads, set_compact


def gqa_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """``LlamaAttention.forward`` for a pruned layer whose query heads read key/value heads by an index map.

    ``kv_index`` (non-persistent buffer, (h_q,)) holds, for each kept query
    head, the position of its key/value head among the kept ones; it is None
    when every kept key/value head serves the same number of query heads in
    order, and ``num_key_value_groups`` then does the repeat as in transformers.
    """
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    m = self._modules  # not Module.__getattr__: a Python fallback lookup on every access
    q = m["q_proj"](hidden_states).view(hidden_shape).transpose(1, 2)  # (B, h_q, T, d)
    k = m["k_proj"](hidden_states).view(hidden_shape).transpose(1, 2)  # (B, h_kv, T, d)
    v = m["v_proj"](hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)  # its older name in transformers 5
    if cache is not None:
        # The cache holds the kept key/value heads only: (B, h_kv, S, d) per layer.
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    index = self._buffers.get("kv_index")
    if index is not None:
        k, v = k.index_select(1, index), v.index_select(1, index)  # (B, h_q, S, d), one per query head
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    # Qwen2 keeps the sliding window on the module, Mistral on the config, Llama has none.
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    out, weights = interface(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=window,
        **kwargs,
    )
    return m["o_proj"](out.reshape(*input_shape, -1).contiguous()), weights


class _HeadlessCacheLayer(DynamicLayer):
    """A cache layer of a layer without key/value heads: (B, 0, S, d) tensors, their length still counted.

    ``DynamicLayer.get_seq_length`` reads an empty tensor as "nothing cached",
    and the cache asks layer 0 for the number of tokens seen (positions, masks).
    """

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys.dim() < 3:
            return 0
        return self.keys.shape[-2]


class HeadlessAttention(nn.Module):
    """Stands in for a decoder attention block whose every query head was removed.

    Returns ``(bias broadcast to hidden, None)`` or zeros where ``o_proj`` has
    no bias, the block's exact output with no head left. With a cache, it adds
    zero-head key/value tensors, so the cache still counts the tokens of this
    layer (a layer 0 without heads must still tell positions).
    """

    def __init__(self, layer_idx: int, head_dim: int, bias: torch.Tensor | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if cache is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)  # (B, 0 heads, T, d)
            cache.update(empty, empty, self.layer_idx, kwargs=kwargs)
            layer = cache.layers[self.layer_idx]
            if type(layer) is DynamicLayer:
                layer.__class__ = _HeadlessCacheLayer  # same state; counts the (B, 0, S, d) tokens
        bias = self._parameters["bias"]
        if bias is None:
            return torch.zeros_like(hidden_states), None
        return bias.expand_as(hidden_states), None


class HeadlessMLP(nn.Module):
    """Stands in for an MLP whose every neuron was removed: ``down_proj``'s bias, or zeros without one."""

    def __init__(self, bias: torch.Tensor | None):
        super().__init__()
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._parameters["bias"]
        return torch.zeros_like(x) if bias is None else bias.expand_as(x)


class GroupedQueryError(ValueError):
    """A config whose query heads do not split evenly into its key/value groups."""


class LlamaAdapter(ArchAdapter):
    name = "llama"
    model_types = ("llama", "qwen2", "mistral")

    causal = True

    def rotary(self, model: nn.Module) -> nn.Module | None:
        return self.base_model(model).rotary_emb  # returns (cos, sin), each (B or 1, T, head_dim)

    def apply_rotary(self, q, k, rotary_output):
        cos, sin = rotary_output
        return apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))

    def num_kv_heads(self, config) -> int:
        return getattr(config, "num_key_value_heads", None) or self.num_heads(config)

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or self.hidden_size(config) // self.num_heads(config)

    def kv_head_of(self, config) -> list[int]:
        n_q, n_kv = self.num_heads(config), self.num_kv_heads(config)
        if n_q % n_kv:
            raise GroupedQueryError(f"{n_q} query heads do not split into {n_kv} key/value groups")
        group = n_q // n_kv
        return [h // group for h in range(n_q)]

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base_model(model).layers)

    def heads(self, layer: nn.Module) -> LayerHeads:
        a = layer.self_attn
        if isinstance(a, HeadlessAttention):
            return LayerHeads(None, None, None, None, None)
        return LayerHeads(a, a.q_proj, a.k_proj, a.v_proj, a.o_proj)

    def set_head_count(self, attention: nn.Module, n: int, head_dim: int) -> None:
        # The forward infers head counts from the projections' widths; the attribute is for readers only.
        attention.num_heads = n

    def set_kv_index(self, attention: nn.Module, kv_index: list[int]) -> None:
        n_kv = max(kv_index) + 1
        group = len(kv_index) // n_kv
        uniform = group * n_kv == len(kv_index) and kv_index == [i // group for i in range(len(kv_index))]
        set_compact(attention, gqa_attention_forward)  # a subclass with this forward; state and hooks stay
        # Even groups: transformers' repeat (or SDPA's native GQA) does it without copying key/value heads.
        attention.num_key_value_groups = group if uniform else 1
        index = None if uniform else torch.tensor(kv_index, dtype=torch.long, device=attention.q_proj.weight.device)
        attention.register_buffer("kv_index", index, persistent=False)

    def make_residual_only(self, layer: nn.Module, config) -> None:
        old = layer.self_attn
        layer.self_attn = HeadlessAttention(old.layer_idx, self.head_dim(config), old.o_proj.bias).train(old.training)

    def ffn(self, layer: nn.Module) -> LayerFFN:
        mlp = layer.mlp
        if isinstance(mlp, HeadlessMLP):
            return LayerFFN(None, None, None)
        return LayerFFN(mlp.gate_proj, mlp.down_proj, mlp.act_fn, up=mlp.up_proj)

    def make_ffn_empty(self, layer: nn.Module, config) -> None:
        old = layer.mlp
        layer.mlp = HeadlessMLP(old.down_proj.bias).train(old.training)
