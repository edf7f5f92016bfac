"""What every architecture adapter says about a model: where its heads live.

An adapter never changes a model by itself; `cahp.model.surgery`, `cahp.model.gates` and
`cahp.model.capture` ask it for modules and act on them. That keeps the knowledge of
one model family in one small file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as _module_mod

ATTENTION_KERNELS = ("eager", "sdpa", "compact")


def check_kernel(kernel: str) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose from {', '.join(ATTENTION_KERNELS)}")


_COMPACT_CLASSES: dict[tuple, type] = {}


def has_hooks(module: nn.Module) -> bool:
    """Whether a call of ``module`` could be observed or changed by a hook (its own or a global one)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _module_mod._global_forward_hooks
        or _module_mod._global_forward_pre_hooks
    )


def _fused_weights(owner: nn.Module, projections) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Concatenated weights and biases of q, k, v, cached on ``owner``; None without biases.

    The cache is rebuilt when any of the six tensors is replaced, moved or
    changed in place (its identity, storage or version counter differs).
    Parameters are read from ``_parameters`` directly: this runs on every call.
    """
    tensors = [m._parameters["weight"] for m in projections] + [m._parameters["bias"] for m in projections]
    if any(t is None for t in tensors):
        return None
    key = [(id(t), t.data_ptr(), t._version) for t in tensors]
    cached = owner.__dict__.get("_cahp_fused_qkv")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            w = torch.cat(tensors[:3]).contiguous()
            b = torch.cat(tensors[3:]).contiguous()
        cached = (key, w, b)
        owner.__dict__["_cahp_fused_qkv"] = cached  # a plain attribute: never saved, never a parameter
    return cached[1], cached[2]


def drop_fused_weights(model: nn.Module) -> None:
    """Free the q/k/v weight copies `project_qkv` cached (they come back on the next compact call)."""
    for m in model.modules():
        m.__dict__.pop("_cahp_fused_qkv", None)


def project_qkv(owner: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, x: torch.Tensor, head_dim: int):
    """Query, key and value heads of ``x``, each (B, h, T, head_dim).

    Without autograd and without hooks on the three projections (nothing can
    tell the difference), one GEMM with their concatenated weights (cached on
    ``owner``, rebuilt when a weight changes or moves) replaces three: fewer
    calls, the same numbers up to rounding. Otherwise, three module calls.
    """
    b, t = x.shape[:2]
    projections = (q, k, v)
    if not torch.is_grad_enabled() and not (has_hooks(q) or has_hooks(k) or has_hooks(v)):
        fused = _fused_weights(owner, projections)
        if fused is not None:
            return F.linear(x, *fused).view(b, t, 3, -1, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(m(x).view(b, t, -1, head_dim).transpose(1, 2) for m in projections)


def project_out_residual(o: nn.Linear, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + o(context)``, (B, T, hidden), for the output projection of an attention block.

    Without autograd and without hooks on ``o``, the bias and the residual go
    into the GEMM's accumulator: one pass ``residual + bias`` into a new
    tensor, then ``addmm_`` adds ``context @ W^T`` to it. ``o(context) +
    residual`` makes two more full-width passes (the broadcast bias written
    into the GEMM output, then a separate add), a cost every block with at
    least one head pays whatever its head count (part of the fixed cost per
    block that ``cahp bench --sweep`` fits; RESULTS.md has the figures).
    ``residual`` is only read. Otherwise (autograd, hooks, no bias, mixed
    dtypes), the module call and an add.
    """
    weight, bias = o._parameters["weight"], o._parameters["bias"]
    if (
        torch.is_grad_enabled()
        or bias is None
        or has_hooks(o)
        or not context.dtype == residual.dtype == weight.dtype  # autocast or mixed precision: let the module cast
    ):
        return o(context) + residual
    out = torch.add(residual, bias).contiguous()  # contiguous: a no-op for a contiguous residual
    out.view(-1, out.shape[-1]).addmm_(context.reshape(-1, context.shape[-1]), weight.t())
    return out


def set_compact(module: nn.Module, forward) -> None:
    """Give ``module`` the compact ``forward`` (through a subclass), or restore its class (``None``).

    The subclass only overrides ``forward``: state, parameters and hooks stay.
    It pickles as its base class plus the forward to put back (`_rebuild_compact`),
    so ``torch.save``/``copy.deepcopy`` of a model work in any process.
    """
    base = getattr(type(module), "_cahp_compact_base", type(module))
    if forward is None:
        module.__class__ = base
        return
    cls = _COMPACT_CLASSES.get((base, forward))
    if cls is None:
        name = f"Compact{base.__name__}"
        cls = type(
            name,
            (base,),
            {"forward": forward, "_cahp_compact_base": base, "__reduce_ex__": _reduce_compact, "__module__": __name__},
        )
        cls.__qualname__ = name
        _COMPACT_CLASSES[(base, forward)] = cls
    module.__class__ = cls


def _reduce_compact(self, protocol):
    cls = type(self)
    return _rebuild_compact, (cls._cahp_compact_base, cls.forward), self.__dict__


def _rebuild_compact(base: type, forward) -> nn.Module:
    module = base.__new__(base)
    set_compact(module, forward)
    return module  # pickle then restores __dict__ (parameters, submodules, hooks)


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
        bias = self._parameters["bias"]  # not Module.__getattr__: this runs on every call
        if self.training and self.dropout.p > 0:
            # Dropout acted element-wise on the broadcast bias in the original block.
            added = self.dropout(bias.expand_as(hidden_states))
        else:
            added = bias
        if self.style == "bias_only":
            return added.expand_as(hidden_states), None
        out = self._modules["LayerNorm"](hidden_states + added)
        if self.style == "mpnet":
            return (out, None) if kwargs.get("output_attentions", False) else (out,)
        return out, None


@dataclass
class LayerFFN:
    """The modules of one layer's feed-forward block (FFN neurons).

    ``inter`` maps hidden -> d_ff (one output row per neuron); ``out`` maps
    d_ff -> hidden (one input column per neuron); ``act`` is the module whose
    forward output is the activated intermediate tensor (batch, seq, d_ff), so
    a forward hook on it can read or scale neurons. All are None for a layer
    whose every neuron was removed (see `ResidualOnlyFFN`).
    """

    inter: nn.Linear | None
    out: nn.Linear | None
    act: nn.Module | None
    up: nn.Linear | None = None  # a second hidden -> d_ff projection whose rows go with inter's (Llama's up_proj)


class ResidualOnlyFFN(nn.Module):
    """Stands in for a feed-forward block whose every neuron was removed.

    With no neuron left the output projection contributes only its bias, so the
    block costs no matmul at all. ``style`` reproduces the calling convention
    of the module it replaces:

    - ``"post_norm"`` (BERT/RoBERTa/ELECTRA ``XOutput``, ``MPNetOutput``):
      ``forward(hidden_states, input_tensor)`` returns
      ``LayerNorm(input_tensor + dropout(bias))``; ``hidden_states`` (what the
      intermediate block passed on, its input once that block is an identity)
      is ignored.
    - ``"bias_only"`` (DistilBERT ``FFN``, whose LayerNorm lives in the block):
      ``forward(input)`` returns ``dropout(bias)`` broadcast to ``input``.
    """

    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm | None, dropout_p: float, style: str):
        super().__init__()
        if style not in ("post_norm", "bias_only"):
            raise ValueError(f"unknown residual-only FFN style {style!r}")
        self.style = style
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = layer_norm
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states if input_tensor is None else input_tensor  # (B, T, hidden)
        bias = self._parameters["bias"]  # not Module.__getattr__: this runs on every call
        if self.training and self.dropout.p > 0:
            # Dropout acted element-wise on the broadcast bias in the original block.
            added = self.dropout(bias.expand_as(residual))
        else:
            added = bias
        if self.style == "bias_only":
            return added.expand_as(residual)
        return self._modules["LayerNorm"](residual + added)


def post_norm_ffn(layer: nn.Module) -> LayerFFN:
    """`LayerFFN` of a layer with ``intermediate.dense`` -> act and ``output.dense`` + LayerNorm (BERT, MPNet)."""
    if isinstance(layer.output, ResidualOnlyFFN):
        return LayerFFN(None, None, None)
    inter = layer.intermediate
    return LayerFFN(inter.dense, layer.output.dense, inter.intermediate_act_fn)


def empty_post_norm_ffn(layer: nn.Module, config) -> None:
    """Empty the FFN of such a layer: the layer calls ``output(intermediate(h), h)``, so an identity
    intermediate does no work and the residual-only output reads ``h`` from its second argument."""
    old = layer.output
    layer.intermediate = nn.Identity()
    layer.output = ResidualOnlyFFN(
        old.dense.bias, old.LayerNorm, config.hidden_dropout_prob, style="post_norm"
    ).train(old.training)


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

    def kv_head_of(self, config) -> list[int]:
        """For each original query head, the original key/value head it reads.

        Encoders have one key/value head per query head (the identity); families
        with grouped-query attention map several query heads to one.
        """
        return list(range(self.num_heads(config)))

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

    def intermediate_size(self, config) -> int:
        """Neurons per FFN of the original (unpruned) architecture (d_ff)."""
        return config.intermediate_size

    def ffn(self, layer: nn.Module) -> LayerFFN:
        """The modules holding ``layer``'s FFN neurons (all None once the FFN is empty)."""
        raise NotImplementedError

    def make_ffn_empty(self, layer: nn.Module, config) -> None:
        """Replace ``layer``'s FFN by a `ResidualOnlyFFN` (residual, output bias, LayerNorm)."""
        raise NotImplementedError

    def set_kv_index(self, attention: nn.Module, kv_index: list[int]) -> None:
        """Tell an attention module which of its key/value heads each of its query heads reads.

        ``kv_index[i]`` is the position, among the module's kept key/value heads,
        of the one query head ``i`` reads. Only families with grouped-query
        attention (`kv_head_of` not the identity) need this; the default does nothing.
        """

    def set_head_index(self, attention: nn.Module, kept: list[int]) -> None:
        """Tell an attention module which original heads it holds.

        Only families with per-head tensors outside q/k/v/o (MPNet's shared
        relative position bias) need this; the default does nothing.
        """

    # --- attention kernels ----------------------------------------------
    def compact_block(self, layer: nn.Module) -> nn.Module | None:
        """The module whose forward the "compact" kernel replaces (None: no heads left)."""
        return None

    compact_forward = None  # the replacing forward (a function of the block), per family

    def set_attention_kernel(self, model: nn.Module, kernel: str) -> None:
        """Run every attention block of ``model`` with ``kernel`` (see `ATTENTION_KERNELS`).

        - "eager" / "sdpa": transformers' own attention implementations.
        - "compact": one short forward per attention block that calls torch's
          ``scaled_dot_product_attention`` directly, skipping transformers'
          per-call dispatch (attention interface, kwargs handling); the same
          weights and the same result. Falls back to the original forward for
          what it does not cover (``output_attentions``, caches, cross-attention).

        Applied alike to a dense and a pruned model, so latency comparisons
        between them stay fair. Surgery, gates and capture keep working under
        every kernel.
        """
        check_kernel(kernel)
        implementation = "sdpa" if kernel == "compact" else kernel
        if model.config._attn_implementation != implementation:
            model.set_attn_implementation(implementation)
        for layer in self.layers(model):
            block = self.compact_block(layer)
            if block is not None:
                set_compact(block, type(self).compact_forward if kernel == "compact" else None)
        if kernel != "compact":
            drop_fused_weights(model)

    causal: bool = False  # decoders: each token attends to itself and earlier tokens only

    def rotary(self, model: nn.Module) -> nn.Module | None:
        """The module whose output the attention applies to queries and keys (rotary embeddings), if any.

        `cahp.model.capture` hooks it to read what it returned for the batch (the
        positions the model actually used) and hands that to `apply_rotary`.
        """
        return None

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, rotary_output) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, h_q, T, d) and keys (B, h_kv, T, d) as the attention scores them; the default: unchanged."""
        return q, k

    def extra_scores(self, model: nn.Module, seq_len: int) -> torch.Tensor | None:
        """Additive attention-score terms shared by all layers, if any.

        Returns a tensor of shape (1, H_orig, T, T) to add to q k^T * scale
        before the mask (MPNet's relative position bias), or None.
        """
        return None

    # --- inputs ---------------------------------------------------------
    uses_token_type_ids: bool = False  # whether the family's task models take segment ids

    def max_positions(self, config) -> int:
        """Longest input, in tokens, that the position embeddings cover."""
        return getattr(config, "max_position_embeddings", 512)

    def input_names(self, config) -> list[str]:
        """The forward inputs of the family's task models: ids, mask, and ``token_type_ids`` where they take them."""
        names = ["input_ids", "attention_mask"]
        if self.uses_token_type_ids:
            names.append("token_type_ids")
        return names
