"""Statistics of the Fisher baseline (Kwon et al. 2022): per-batch gate gradients, the block-diagonal
Fisher objective of a mask, and the least-squares system of mask tuning.

Measure, never decide: `cahp.selectors.fisher` searches, rearranges and tunes with these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.gates import head_gates
from cahp.model.heads import kept_heads
from cahp.stats.salience import iter_gate_gradients
from cahp.train.evaluate import model_inputs

__all__ = ["BatchGateGradients", "block_fisher_objective", "capture_layer", "collect_gate_gradients",
           "mha_normal_equations"]


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
    adapter = get_adapter(model)
    layer = adapter.layers(model)[layer_idx]
    o = adapter.heads(layer).o
    got = {}

    def on_layer(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]

    def on_o(module, args):
        got["x"] = args[0]
        raise _Stop

    handles = [layer.register_forward_pre_hook(on_layer, with_kwargs=True),
               o.register_forward_pre_hook(on_o, prepend=True)]
    try:
        if gates is not None:
            with head_gates(model, init=gates.float()):
                model(**model_inputs(batch, device))
        else:
            model(**model_inputs(batch, device))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got["h"], got["x"]


@torch.no_grad()
def mha_normal_equations(model: nn.Module, layer_idx: int, heads: list[int], gates: torch.Tensor,
                         batches: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal equations (AᵀA (m+1, m+1), Aᵀb (m+1,)) of Kwon et al.'s per-layer least squares.

    Columns of A: each of the m kept heads' contribution to the output
    projection, computed from the student's (pruned, earlier layers tuned) layer
    input, plus a column of ones; b: the teacher's (dense) pre-LayerNorm block
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
        real = batch["attention_mask"].to(device).bool()
        h_t, x_t = capture_layer(model, layer_idx, batch, device, None)
        teacher = (o(x_t) + h_t)[real].double()  # (N, D) over the N real tokens
        h_s, x_s = capture_layer(model, layer_idx, batch, device, gates)
        h_s, x_s = h_s[real].double(), x_s[real].double()
        xs = torch.stack([x_s[:, p * d:(p + 1) * d] for p in pos])  # (m, N, d)
        per_head = torch.einsum("mnd,mhd->mnh", xs, W).reshape(m, -1)  # (m, N*D)
        A = torch.cat([per_head, per_head.new_ones(1, per_head.shape[1])]).T  # (N*D, m+1)
        b = (teacher - bias - h_s).flatten()
        ata += A.T @ A
        atb += A.T @ b
    return ata.cpu(), atb.cpu()
