"""Statistics of the Fisher baseline (Kwon et al. 2022): per-batch gate gradients, the block-diagonal
Fisher objective of a mask, and the least-squares system of mask tuning.

Measure, never decide: `cahp.selectors.fisher` searches, rearranges and tunes with these.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.arch import get_adapter
from cahp.model.gates import head_gates
from cahp.model.heads import kept_heads
from cahp.model.neurons import kept_neurons, neuron_gates
from cahp.stats.salience import LossFn, iter_gate_gradients
from cahp.train.evaluate import labelled_loss, model_inputs

__all__ = ["BatchGateGradients", "block_fisher_objective", "capture_block", "capture_layer",
           "collect_gate_gradients", "collect_joint_gate_gradients", "ffn_normal_equations",
           "joint_mha_normal_equations", "mha_normal_equations"]


class BatchGateGradients:
    """Accumulator that keeps every batch's gate gradient (the Fisher *matrix* needs them, not just sums).

    ``add_batch(grad (L, H))``; ``result()`` -> (B, L, H) float64; `fisher_matrix(layer)`
    -> (H, H) mean over batches of g gᵀ; `diagonal()` -> (L, H) mean g² (= the
    ``fisher`` of `cahp.stats.salience.gate_gradients` on the same batches).
    """

    def __init__(self):
        self.grads: list[torch.Tensor] = []

    def add_batch(self, grad: torch.Tensor) -> None:
        """Keep one batch's (L, H) gradient (as float64 on the CPU)."""
        self.grads.append(grad.detach().double().cpu())

    def result(self) -> torch.Tensor:
        """(B, L, H) float64 gradients in batch order."""
        if not self.grads:
            raise ValueError("BatchGateGradients has seen no batch")
        return torch.stack(self.grads)

    def fisher_matrix(self, layer: int) -> torch.Tensor:
        """(H, H) empirical Fisher of one layer's gates: mean over batches of g gᵀ."""
        g = self.result()[:, layer]
        return g.T @ g / g.shape[0]

    def diagonal(self) -> torch.Tensor:
        """(L, H) mean g² over batches."""
        return self.result().square().mean(0)


def collect_gate_gradients(model: nn.Module, batches: Sequence[dict], mask: torch.Tensor | None = None,
                           progress: bool = False) -> torch.Tensor:
    """Per-batch gradients of the loss w.r.t. the head gates: (B, L, H) float64.

    The same passes as `cahp.stats.salience.gate_gradients` (eval mode, only the
    gates need gradients), keeping each batch's gradient vector (Kwon et al.'s
    ``collect_mask_grads``).
    """
    acc = BatchGateGradients()
    for grad in iter_gate_gradients(model, batches, mask=mask, progress=progress, desc="gate gradients"):
        acc.add_batch(grad)
    return acc.result()


def block_fisher_objective(mask: torch.Tensor, grads: torch.Tensor, present: torch.Tensor | None = None) -> float:
    """Block-diagonal Fisher objective of a mask (higher is better; 0 = nothing removed).

    With per-batch gate gradients g_b (Kwon et al.), removing the heads P_l of
    layer l changes the loss by about ½ (1-m)ᵀ F_l (1-m), F_l = mean_b g_b g_bᵀ
    restricted to layer l. The objective is minus the sum over layers:
    ``-½ Σ_l mean_b (Σ_{h ∈ P_l} g_{b,l,h})²``. ``present`` (default: all)
    marks the heads the model has; absent heads are never counted as removed.
    """
    g = grads.double()
    present = torch.ones(mask.shape, dtype=torch.bool) if present is None else present
    removed = (present & ~mask).double()  # (L, H)
    per_batch = (g * removed).sum(-1)  # (B, L)
    return float(-0.5 * per_batch.square().mean(0).sum())


class _Stop(Exception):
    """Raised by a capture hook: the forward pass has gone far enough."""


def capture_layer(model: nn.Module, layer_idx: int, batch: dict, device, gates: torch.Tensor | None):
    """(layer input hidden states (B, T, D), raw input of layer_idx's output projection (B, T, kept * d)).

    The forward pass stops at that projection; ``gates`` (if given) act on the layers before.
    """
    return capture_block(model, layer_idx, "attention", batch, device, gates)


@torch.no_grad()
def mha_normal_equations(model: nn.Module, layer_idx: int, heads: list[int], gates: torch.Tensor,
                         batches: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal equations (AᵀA (m+1, m+1), Aᵀb (m+1,)) of Kwon et al.'s per-layer least squares.

    Columns of A: each of the m kept heads' contribution to the output
    projection, computed from the student's (pruned, earlier layers tuned) layer
    input, plus a column of ones; b: the teacher's (dense) pre-LayerNorm block
    output minus the projection bias and the student's residual. Real tokens only.
    """
    return joint_mha_normal_equations(model, layer_idx, heads, gates, None, batches)


# ---------------------------------------------------------------------------
# Heads and FFN neurons together (Kwon et al.'s joint search, `cahp.selectors.joint_fisher`)
# ---------------------------------------------------------------------------


def collect_joint_gate_gradients(model: nn.Module, batches: Sequence[dict], progress: bool = False,
                                 loss_fn: LossFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch gradients of a loss w.r.t. head AND neuron gates: ((B, L, H), (B, L, d_ff)) float64 on the CPU.

    One forward and backward pass per batch with `head_gates` and `neuron_gates`
    at 1 (Kwon et al.'s ``collect_mask_grads`` for both masks), eval mode (the
    deployed function, no dropout); the weights' ``requires_grad`` is switched
    off for the passes (only the gates need gradients) and restored, as is the
    training mode. Gates the loss never reads (units the model no longer
    holds) get 0.

    ``loss_fn(model, batch, device)``: the loss L (as in
    `cahp.stats.salience.iter_gate_gradients`); None: the labelled loss
    (`labelled_loss`). The embedding objective passes its label-free loss
    (`cahp.selectors.label_free.LabelFreeJointFisher`).
    """
    loss_fn = labelled_loss if loss_fn is None else loss_fn
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    heads, neurons = [], []
    try:
        with head_gates(model, requires_grad=True) as hg, neuron_gates(model, requires_grad=True) as ng:
            for batch in tqdm(batches, desc="joint gate gradients", disable=not progress, mininterval=2):
                loss = loss_fn(model, batch, device)
                # allow_unused: a model whose every FFN (or attention) block is empty never reads those gates.
                gh, gn = torch.autograd.grad(loss, (hg.values, ng.values), allow_unused=True)
                heads.append(torch.zeros_like(hg.values) if gh is None else gh)
                neurons.append(torch.zeros_like(ng.values) if gn is None else gn)
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    if not heads:
        raise ValueError("collect_joint_gate_gradients needs at least one batch")
    return torch.stack(heads).double().cpu(), torch.stack(neurons).double().cpu()


def capture_block(model: nn.Module, layer_idx: int, block: str, batch: dict, device,
                  head_values: torch.Tensor | None = None, neuron_values: torch.Tensor | None = None):
    """(residual (B, T, D), raw input of the block's output projection (B, T, kept units)) of one layer's block.

    ``block``: "attention" (the residual is the layer input; projection: the
    attention output projection, input = the kept heads' contexts) or "ffn"
    (the residual is the FFN input, which post-norm encoders add back before
    the block's LayerNorm; projection: the FFN output projection, input = the
    kept neurons' activations). The projection input is read before any gate
    scales it; the forward pass stops there. ``head_values`` /
    ``neuron_values`` (if given): gate values (L, H) / (L, d_ff) applied
    during the pass (the student; None and None: the model as it is, the teacher).
    """
    adapter = get_adapter(model)
    layer = adapter.layers(model)[layer_idx]
    if block == "attention":
        residual_module, proj = layer, adapter.heads(layer).o
    elif block == "ffn":
        ffn = adapter.ffn(layer)
        residual_module, proj = ffn.inter, ffn.out
    else:
        raise ValueError(f"unknown block {block!r}; choose 'attention' or 'ffn'")
    if proj is None:
        raise ValueError(f"layer {layer_idx} has an empty {block} block: nothing to capture")
    got = {}

    def on_residual(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]

    def on_proj(module, args):
        got["x"] = args[0]
        raise _Stop

    handles = [residual_module.register_forward_pre_hook(on_residual, with_kwargs=True),
               proj.register_forward_pre_hook(on_proj, prepend=True)]  # prepend: before any gate hook
    try:
        with ExitStack() as stack:
            if head_values is not None:
                stack.enter_context(head_gates(model, init=head_values.float()))
            if neuron_values is not None:
                stack.enter_context(neuron_gates(model, init=neuron_values.float()))
            model(**model_inputs(batch, device))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got["h"], got["x"]


def _token_rows(batch: dict, device, first_token_only: bool) -> torch.Tensor:
    """(B, T) bool: the real tokens, or only each row's first token (what a [CLS] classifier reads)."""
    real = batch["attention_mask"].to(device).bool()
    if first_token_only:
        first = torch.zeros_like(real)
        first[:, 0] = True
        return first
    return real


@torch.no_grad()
def joint_mha_normal_equations(model: nn.Module, layer_idx: int, heads: list[int], head_values: torch.Tensor,
                               neuron_values: torch.Tensor,
                               batches: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """`mha_normal_equations` with a student whose FFN neurons are gated too: (AᵀA (m+1, m+1), Aᵀb (m+1,)).

    The teacher is the model without gates (dense); the student runs with
    ``head_values`` (L, H) and ``neuron_values`` (L, d_ff) (pruned, earlier
    layers tuned), as in Kwon et al.'s ``get_mha_lstsq`` (student neuron mask
    applied). Columns of A: the m kept heads' contributions to the output
    projection, plus a column of ones; b: the teacher's pre-LayerNorm block
    output minus the projection bias and the student's residual. Real tokens only.
    """
    adapter = get_adapter(model)
    d = adapter.head_dim(model.config)
    o = adapter.heads(adapter.layers(model)[layer_idx]).o
    pos = [kept_heads(model.config)[layer_idx].index(h) for h in heads]
    W = torch.stack([o.weight[:, p * d:(p + 1) * d].double() for p in pos])  # (m, D, d)
    bias = o.bias.double() if o.bias is not None else 0.0
    m = len(heads)
    device = next(model.parameters()).device
    ata = torch.zeros(m + 1, m + 1, dtype=torch.float64, device=device)
    atb = torch.zeros(m + 1, dtype=torch.float64, device=device)
    model.eval()
    for batch in batches:
        rows = _token_rows(batch, device, False)
        h_t, x_t = capture_block(model, layer_idx, "attention", batch, device)
        teacher = (o(x_t) + h_t)[rows].double()  # (N, D)
        h_s, x_s = capture_block(model, layer_idx, "attention", batch, device, head_values, neuron_values)
        h_s, x_s = h_s[rows].double(), x_s[rows].double()
        xs = torch.stack([x_s[:, p * d:(p + 1) * d] for p in pos])  # (m, N, d)
        per_head = torch.einsum("mnd,mhd->mnh", xs, W).reshape(m, -1)  # (m, N*D)
        A = torch.cat([per_head, per_head.new_ones(1, per_head.shape[1])]).T  # (N*D, m+1)
        b = (teacher - bias - h_s).flatten()
        ata += A.T @ A
        atb += A.T @ b
    return ata.cpu(), atb.cpu()


@torch.no_grad()
def ffn_normal_equations(model: nn.Module, layer_idx: int, neurons: list[int], head_values: torch.Tensor,
                         neuron_values: torch.Tensor, batches: Sequence[dict],
                         first_token_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal equations (AᵀA (m, m), Aᵀb (m,)) of Kwon et al.'s least squares for m kept FFN neurons of a layer.

    Unknowns: the kept neurons' gate values g, so that the student's
    pre-LayerNorm FFN output ``Σ_i g_i a_i w_i + bias + h_s`` (a_i: neuron i's
    activation, w_i: its column of the output projection, h_s: the student's
    FFN input = residual) matches the teacher's ``out(a_t) + h_t`` over the
    tokens (real ones, or each row's first one with ``first_token_only``: all
    a classifier reads after the last layer, their ``cls_only``). A has one
    row per (token, hidden unit), N·D rows, and is never built (N·D x m
    would not fit for 3072 neurons): with X (N, m) the activations and
    W (D, m) the columns, ``AᵀA = (XᵀX) ∘ (WᵀW)`` and
    ``Aᵀb = Σ_n X[n] ∘ (W ᵀ b_n)``, as in their ``get_ffn_lstsq`` (no column
    of ones there). Cost per batch O(N m² + N D m) in float64, memory O(m²).
    """
    adapter = get_adapter(model)
    out = adapter.ffn(adapter.layers(model)[layer_idx]).out
    kept = kept_neurons(model.config)[layer_idx]
    where = {n: p for p, n in enumerate(kept)}
    device = next(model.parameters()).device
    pos = torch.tensor([where[n] for n in neurons], dtype=torch.long, device=device)
    W = out.weight.double().index_select(1, pos)  # (D, m)
    gram_w = W.T @ W  # (m, m)
    bias = out.bias.double() if out.bias is not None else 0.0
    m = len(neurons)
    ata = torch.zeros(m, m, dtype=torch.float64, device=device)
    atb = torch.zeros(m, dtype=torch.float64, device=device)
    model.eval()
    for batch in batches:
        rows = _token_rows(batch, device, first_token_only)
        h_t, x_t = capture_block(model, layer_idx, "ffn", batch, device)
        teacher = (out(x_t) + h_t)[rows].double()  # (N, D)
        h_s, x_s = capture_block(model, layer_idx, "ffn", batch, device, head_values, neuron_values)
        X = x_s[rows].double().index_select(1, pos)  # (N, m)
        b = teacher - bias - h_s[rows].double()  # (N, D)
        ata += (X.T @ X) * gram_w
        atb += ((b @ W) * X).sum(0)
    return ata.cpu(), atb.cpu()
