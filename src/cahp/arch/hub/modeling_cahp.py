"""Encoders and Llama-family decoders pruned by cahp, loadable with torch and transformers alone.

This file is copied into every folder cahp saves. Each model class is its
family's own transformers class; ``__init__`` only shrinks or replaces
modules to the pruned shapes recorded in the config (see
configuration_cahp.py), so ``from_pretrained`` then loads the saved tensors
into modules of exactly their shapes. Nothing else changes: the forward
passes are transformers' own, except for the small stand-ins below
(blocks with no head or no neuron left, MPNet's shared position bias, and a
decoder attention whose key/value groups became uneven).

Load with::

    AutoModel.from_pretrained(folder, trust_remote_code=True)
    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # Llama, Qwen2, Mistral

Decoders (grouped-query attention): each layer keeps the key/value heads of
its kept query heads, so the KV cache, whose layers take their shapes from
the first keys they store, holds only those. Where every kept key/value head
still serves the same number of query heads, transformers' own forward does
the repeat (``num_key_value_groups``); otherwise the layer gets
`CahpGroupedAttention`'s forward, which gives each query head its own key/value
head through an index map. A layer without query heads gets
`CahpHeadlessAttention`, which still counts its tokens in the cache.
"""

import torch
from torch import nn
from transformers import (
    AutoModel,
    BertForSequenceClassification,
    BertModel,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraForSequenceClassification,
    ElectraModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
    MPNetForSequenceClassification,
    MPNetModel,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Model,
    RobertaForSequenceClassification,
    RobertaModel,
)
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, eager_attention_forward
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from .configuration_cahp import (
    CahpBertConfig,
    CahpDistilBertConfig,
    CahpElectraConfig,
    CahpLlamaConfig,
    CahpMistralConfig,
    CahpMPNetConfig,
    CahpQwen2Config,
    CahpRobertaConfig,
)


def kept_heads(config):
    """{layer: original head indices kept}, or None for a model with every head."""
    stored = getattr(config, "cahp_kept_heads", None)
    return None if stored is None else {int(k): sorted(v) for k, v in stored.items()}


def kept_neuron_counts(config):
    """Feed-forward width per layer, or None for a model with every neuron."""
    stored = getattr(config, "cahp_kept_neurons", None)
    return None if stored is None else [int(c) for c in stored["counts"]]


class ResidualOnlyAttention(nn.Module):
    """An attention block with no head left: the output projection adds only its bias.

    ``style`` follows the block it stands for: "post_norm" (BERT family,
    returns ``(LayerNorm(h + b), None)``), "mpnet" (returns ``(LayerNorm(h + b),)``),
    "bias_only" (DistilBERT, whose LayerNorm sits in the layer: returns ``(b, None)``).
    """

    def __init__(self, hidden, eps, dropout_p, style):
        super().__init__()
        self.style = style
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.LayerNorm = None if style == "bias_only" else nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, hidden_states, *args, **kwargs):
        added = self.dropout(self.bias.expand_as(hidden_states)) if self.training else self.bias
        if self.style == "bias_only":
            return added.expand_as(hidden_states), None
        out = self.LayerNorm(hidden_states + added)
        if self.style == "mpnet":
            return (out, None) if kwargs.get("output_attentions", False) else (out,)
        return out, None


class ResidualOnlyFFN(nn.Module):
    """A feed-forward block with no neuron left: the output projection adds only its bias, no matmul.

    "post_norm" (BERT family, MPNet: stands for ``XOutput``, called as
    ``output(intermediate(h), h)`` with an identity intermediate) returns
    ``LayerNorm(h + b)``; "bias_only" (DistilBERT ``FFN``, whose LayerNorm sits
    in the layer) returns ``b`` broadcast to its input.
    """

    def __init__(self, hidden, eps, dropout_p, style):
        super().__init__()
        self.style = style
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.LayerNorm = None if style == "bias_only" else nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, hidden_states, input_tensor=None):
        residual = hidden_states if input_tensor is None else input_tensor
        added = self.dropout(self.bias.expand_as(residual)) if self.training else self.bias
        if self.style == "bias_only":
            return added.expand_as(residual)
        return self.LayerNorm(residual + added)


class CahpMPNetSelfAttention(MPNetSelfAttention):
    """MPNet self-attention holding some of the original heads (``cahp_heads``).

    The relative position bias (batch, original heads, T, T) is shared by all
    layers; each layer takes the channels of the heads it kept.
    """

    cahp_heads = ()

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        if position_bias is not None and position_bias.shape[1] != len(self.cahp_heads):
            index = torch.tensor(self.cahp_heads, dtype=torch.long, device=position_bias.device)
            position_bias = position_bias.index_select(1, index)
        return super().forward(hidden_states, attention_mask, position_bias, output_attentions, **kwargs)


def _resize(owner, name, in_features, out_features):
    """Replace the Linear ``owner.<name>`` by one of the pruned shape (its values come from the checkpoint)."""
    setattr(owner, name, nn.Linear(in_features, out_features))


def shrink(base, config, family):
    """Resize ``base`` (the encoder model) in place to the heads and neurons recorded in ``config``."""
    heads, counts = kept_heads(config), kept_neuron_counts(config)
    if family == "distilbert":
        hidden, n_heads, layers = config.dim, config.n_heads, base.transformer.layer
    else:
        hidden, n_heads, layers = config.hidden_size, config.num_attention_heads, base.encoder.layer
    head_dim = hidden // n_heads
    for i, layer in enumerate(layers):
        kept = heads[i] if heads is not None else list(range(n_heads))
        if len(kept) < n_heads:
            _shrink_attention(layer, config, family, kept, head_dim, hidden)
        if counts is not None:
            _shrink_ffn(layer, config, family, counts[i], hidden)


def _shrink_attention(layer, config, family, kept, head_dim, hidden):
    """q/k/v lose the rows of removed heads, the output projection their columns; no head left: residual only."""
    n = len(kept)
    if family == "distilbert":
        if n == 0:
            layer.attention = ResidualOnlyAttention(hidden, 1e-12, 0.0, "bias_only")
            return
        a = layer.attention
        for name in ("q_lin", "k_lin", "v_lin"):
            _resize(a, name, hidden, n * head_dim)
        _resize(a, "out_lin", n * head_dim, hidden)
        a.n_heads = n
    elif family == "mpnet":
        if n == 0:
            layer.attention = ResidualOnlyAttention(hidden, config.layer_norm_eps, config.hidden_dropout_prob, "mpnet")
            return
        a = layer.attention.attn
        for name in ("q", "k", "v"):
            _resize(a, name, hidden, n * head_dim)
        _resize(a, "o", n * head_dim, hidden)
        a.__class__ = CahpMPNetSelfAttention
        a.cahp_heads = list(kept)
        a.num_attention_heads, a.all_head_size = n, n * head_dim
    else:
        if n == 0:
            layer.attention = ResidualOnlyAttention(
                hidden, config.layer_norm_eps, config.hidden_dropout_prob, "post_norm"
            )
            return
        s = layer.attention.self
        for name in ("query", "key", "value"):
            _resize(s, name, hidden, n * head_dim)
        _resize(layer.attention.output, "dense", n * head_dim, hidden)
        s.num_attention_heads, s.all_head_size = n, n * head_dim


def _shrink_ffn(layer, config, family, width, hidden):
    """The intermediate projection keeps ``width`` rows, the output projection as many columns; 0: residual only."""
    if family == "distilbert":
        if width == 0:
            layer.ffn = ResidualOnlyFFN(hidden, 1e-12, config.dropout, "bias_only")
        else:
            _resize(layer.ffn, "lin1", hidden, width)
            _resize(layer.ffn, "lin2", width, hidden)
    elif width == 0:
        layer.intermediate = nn.Identity()
        layer.output = ResidualOnlyFFN(hidden, config.layer_norm_eps, config.hidden_dropout_prob, "post_norm")
    else:
        _resize(layer.intermediate, "dense", hidden, width)
        _resize(layer.output, "dense", width, hidden)


class CahpPrunedMixin:
    """Shrinks the encoder right after the family's own __init__ built it at full size."""

    cahp_family = ""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        shrink(getattr(self, self.base_model_prefix, self), config, self.cahp_family)


class CahpBertModel(CahpPrunedMixin, BertModel):
    config_class = CahpBertConfig
    cahp_family = "bert"


class CahpBertForSequenceClassification(CahpPrunedMixin, BertForSequenceClassification):
    config_class = CahpBertConfig
    cahp_family = "bert"


class CahpRobertaModel(CahpPrunedMixin, RobertaModel):
    config_class = CahpRobertaConfig
    cahp_family = "roberta"


class CahpRobertaForSequenceClassification(CahpPrunedMixin, RobertaForSequenceClassification):
    config_class = CahpRobertaConfig
    cahp_family = "roberta"


class CahpElectraModel(CahpPrunedMixin, ElectraModel):
    config_class = CahpElectraConfig
    cahp_family = "electra"


class CahpElectraForSequenceClassification(CahpPrunedMixin, ElectraForSequenceClassification):
    config_class = CahpElectraConfig
    cahp_family = "electra"


class CahpDistilBertModel(CahpPrunedMixin, DistilBertModel):
    config_class = CahpDistilBertConfig
    cahp_family = "distilbert"


class CahpDistilBertForSequenceClassification(CahpPrunedMixin, DistilBertForSequenceClassification):
    config_class = CahpDistilBertConfig
    cahp_family = "distilbert"


class CahpMPNetModel(CahpPrunedMixin, MPNetModel):
    config_class = CahpMPNetConfig
    cahp_family = "mpnet"


class CahpMPNetForSequenceClassification(CahpPrunedMixin, MPNetForSequenceClassification):
    config_class = CahpMPNetConfig
    cahp_family = "mpnet"



# --- Llama-family decoders (grouped-query attention) --------------------------


class CahpGroupedAttention:
    """Mixed into a decoder attention whose kept query heads read key/value heads unevenly.

    ``cahp_kv_index[i]`` is the position, among the layer's kept key/value
    heads, of the one kept query head ``i`` reads. The cache stores the kept
    key/value heads only, (B, h_kv, S, d); they are gathered to one per query
    head, (B, h_q, S, d), after the cache, so ``num_key_value_groups`` is 1.
    The index is a plain attribute and its tensor is made on first use on the
    keys' device: a buffer would be left uninitialised by ``from_pretrained``,
    which builds the model without weights and fills in only saved tensors.
    """

    cahp_kv_index = ()

    def _cahp_index(self, device):
        index = self.__dict__.get("_cahp_index_tensor")
        if index is None or index.device != device:
            index = torch.tensor(self.cahp_kv_index, dtype=torch.long, device=device)
            self.__dict__["_cahp_index_tensor"] = index
        return index

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)  # its older name
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, h_q, T, d)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, h_kv, T, d)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        index = self._cahp_index(k.device)
        k, v = k.index_select(1, index), v.index_select(1, index)
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
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class CahpGroupedLlamaAttention(CahpGroupedAttention, LlamaAttention):
    pass


class CahpGroupedQwen2Attention(CahpGroupedAttention, Qwen2Attention):
    pass


class CahpGroupedMistralAttention(CahpGroupedAttention, MistralAttention):
    pass


_GROUPED = {
    LlamaAttention: CahpGroupedLlamaAttention,
    Qwen2Attention: CahpGroupedQwen2Attention,
    MistralAttention: CahpGroupedMistralAttention,
}


class _HeadlessCacheLayer(DynamicLayer):
    """A cache layer of a layer without key/value heads: (B, 0, S, d) tensors, their length still counted.

    ``DynamicLayer.get_seq_length`` reads an empty tensor as "nothing cached",
    and the cache asks layer 0 for the number of tokens seen (positions, masks).
    """

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys.dim() < 3:
            return 0
        return self.keys.shape[-2]


class CahpHeadlessAttention(nn.Module):
    """A decoder attention block with no query head left: adds ``o_proj``'s bias, or exactly zero without one.

    With a cache it stores zero-head keys and values, (B, 0, T, d), so the
    cache still counts this layer's tokens (a layer 0 without heads must still
    tell positions and mask sizes).
    """

    def __init__(self, layer_idx, head_dim, hidden, bias):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.register_parameter("bias", nn.Parameter(torch.zeros(hidden)) if bias else None)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if cache is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            cache.update(empty, empty, self.layer_idx, kwargs=kwargs)
            layer = cache.layers[self.layer_idx]
            if type(layer) is DynamicLayer:
                layer.__class__ = _HeadlessCacheLayer  # same state; counts the (B, 0, S, d) tokens
        if self.bias is None:
            return torch.zeros_like(hidden_states), None
        return self.bias.expand_as(hidden_states), None


class CahpHeadlessMLP(nn.Module):
    """A gated MLP with no neuron left: ``down_proj``'s bias, or zeros without one."""

    def __init__(self, hidden, bias):
        super().__init__()
        self.register_parameter("bias", nn.Parameter(torch.zeros(hidden)) if bias else None)

    def forward(self, x):
        return torch.zeros_like(x) if self.bias is None else self.bias.expand_as(x)


def _resize_keeping_bias(owner, name, in_features, out_features):
    """Replace the Linear ``owner.<name>`` by one of the pruned shape, with a bias where it had one."""
    setattr(owner, name, nn.Linear(in_features, out_features, bias=getattr(owner, name).bias is not None))


def kv_plan(kept, n_heads, n_kv_heads):
    """For kept query heads (ascending): the kept key/value heads and, per kept query head, its one's position.

    Query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``;
    a key/value head stays while one of its query heads does.
    """
    group = n_heads // n_kv_heads
    kv_kept = sorted({h // group for h in kept})
    return kv_kept, [kv_kept.index(h // group) for h in kept]


def shrink_decoder(base, config):
    """Resize ``base`` (a LlamaModel, Qwen2Model or MistralModel) in place to the heads and neurons of ``config``."""
    heads, counts = kept_heads(config), kept_neuron_counts(config)
    hidden, n_heads = config.hidden_size, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    for i, layer in enumerate(base.layers):
        kept = heads[i] if heads is not None else list(range(n_heads))
        if len(kept) < n_heads:
            _shrink_grouped_attention(layer, kept, n_heads, n_kv, head_dim, hidden)
        if counts is not None:
            _shrink_gated_mlp(layer, counts[i], hidden)


def _shrink_grouped_attention(layer, kept, n_heads, n_kv, head_dim, hidden):
    """q and o keep the kept query heads, k and v their key/value heads; no query head left: residual only."""
    a = layer.self_attn
    if not kept:
        layer.self_attn = CahpHeadlessAttention(a.layer_idx, head_dim, hidden, a.o_proj.bias is not None)
        return
    kv_kept, kv_index = kv_plan(kept, n_heads, n_kv)
    _resize_keeping_bias(a, "q_proj", hidden, len(kept) * head_dim)
    _resize_keeping_bias(a, "k_proj", hidden, len(kv_kept) * head_dim)
    _resize_keeping_bias(a, "v_proj", hidden, len(kv_kept) * head_dim)
    _resize_keeping_bias(a, "o_proj", len(kept) * head_dim, hidden)
    group = len(kept) // len(kv_kept)
    if kv_index == [i // group for i in range(len(kept))]:
        a.num_key_value_groups = group  # even groups: the family's forward repeats as before
        return
    a.__class__ = _GROUPED[type(a)]
    a.num_key_value_groups = 1
    a.cahp_kv_index = tuple(kv_index)


def _shrink_gated_mlp(layer, width, hidden):
    """gate_proj and up_proj keep ``width`` rows, down_proj as many columns; 0: ``CahpHeadlessMLP``."""
    mlp = layer.mlp
    if width == 0:
        layer.mlp = CahpHeadlessMLP(hidden, mlp.down_proj.bias is not None)
        return
    _resize_keeping_bias(mlp, "gate_proj", hidden, width)
    _resize_keeping_bias(mlp, "up_proj", hidden, width)
    _resize_keeping_bias(mlp, "down_proj", width, hidden)


class CahpDecoderMixin:
    """Shrinks the decoder right after the family's own __init__ built it at full size."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        shrink_decoder(getattr(self, self.base_model_prefix, self), config)


class CahpLlamaModel(CahpDecoderMixin, LlamaModel):
    config_class = CahpLlamaConfig


class CahpLlamaForCausalLM(CahpDecoderMixin, LlamaForCausalLM):
    config_class = CahpLlamaConfig


class CahpQwen2Model(CahpDecoderMixin, Qwen2Model):
    config_class = CahpQwen2Config


class CahpQwen2ForCausalLM(CahpDecoderMixin, Qwen2ForCausalLM):
    config_class = CahpQwen2Config


class CahpMistralModel(CahpDecoderMixin, MistralModel):
    config_class = CahpMistralConfig


class CahpMistralForCausalLM(CahpDecoderMixin, MistralForCausalLM):
    config_class = CahpMistralConfig


class CahpDecoderClassifierMixin:
    """A family sequence classifier whose decoder is the pruned one.

    The families' classifiers build their decoder with ``AutoModel.from_config(config)``;
    registering the config's class first makes that the pruned model class
    (already shrunk, so nothing else changes). The config's own class is
    registered, not the one imported here: transformers may load
    configuration_cahp.py twice, as two modules with two classes of one name.
    """

    cahp_base_class = None

    def __init__(self, config, *args, **kwargs):
        AutoModel.register(type(config), self.cahp_base_class, exist_ok=True)
        super().__init__(config, *args, **kwargs)


class CahpLlamaForSequenceClassification(CahpDecoderClassifierMixin, LlamaForSequenceClassification):
    config_class = CahpLlamaConfig
    cahp_base_class = CahpLlamaModel


class CahpQwen2ForSequenceClassification(CahpDecoderClassifierMixin, Qwen2ForSequenceClassification):
    config_class = CahpQwen2Config
    cahp_base_class = CahpQwen2Model


class CahpMistralForSequenceClassification(CahpDecoderClassifierMixin, MistralForSequenceClassification):
    config_class = CahpMistralConfig
    cahp_base_class = CahpMistralModel
