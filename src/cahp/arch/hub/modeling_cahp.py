"""Encoders pruned by cahp, loadable with torch and transformers alone.

This file is copied into every folder cahp saves. Each model class is its
family's own transformers class; ``__init__`` only shrinks or replaces
modules to the pruned shapes recorded in the config (see
configuration_cahp.py), so ``from_pretrained`` then loads the saved tensors
into modules of exactly their shapes. Nothing else changes: the forward
passes are transformers' own, except for the three small stand-ins below
(blocks with no head or no neuron left, and MPNet's shared position bias).

Load with::

    AutoModel.from_pretrained(folder, trust_remote_code=True)
    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
"""

import torch
from torch import nn
from transformers import (
    BertForSequenceClassification,
    BertModel,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraForSequenceClassification,
    ElectraModel,
    MPNetForSequenceClassification,
    MPNetModel,
    RobertaForSequenceClassification,
    RobertaModel,
)
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

from .configuration_cahp import (
    CahpBertConfig,
    CahpDistilBertConfig,
    CahpElectraConfig,
    CahpMPNetConfig,
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
