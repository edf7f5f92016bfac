"""Attention probabilities of every head, batch by batch, for any attention kernel.

sdpa and flash kernels never materialise attention probabilities, and
``output_attentions`` only works with eager attention. So instead of asking the
model, `AttentionCapture` hooks the query and key projections, and recomputes
``softmax(q k^T / sqrt(d) + extra)`` per layer after the forward pass, with
padded keys set to -inf (exactly zero mass) and the family's extra score terms
(MPNet's relative position bias). The captured tensors belong to one batch and
are dropped when the next batch starts.

Decoders (Llama family) add three things, all asked of the adapter: rotary
embeddings (the rotary module's output for the batch is hooked, so q and k are
rotated at the positions the model used), grouped-query attention (each query
head scores the keys of its own key/value head, also in unevenly pruned
groups) and the causal mask (future keys get zero mass). Left and right
padding both work: padded keys get zero mass, and padded query rows, which see
no real key under a causal mask with left padding, hold zeros. Sliding
attention windows (Mistral, Qwen2) are not applied: calibration text is
assumed shorter than the window.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.heads import kept_heads, kv_head_of


@dataclass
class AttentionBatch:
    """One batch's attention.

    Attributes:
        probs: per layer, (B, h_l, T, T) probabilities (query rows, key columns),
            or None for a layer without heads.
        head_ids: per layer, the original indices of its h_l heads.
        attention_mask: (B, T) bool, True on real tokens.
        outputs: the model's outputs for the batch (logits etc.).
    """

    probs: list[torch.Tensor | None]
    head_ids: list[list[int]]
    attention_mask: torch.Tensor
    outputs: object = None

    def flat_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of every column of `real_rows`, layer-major."""
        return [(layer, h) for layer, hs in enumerate(self.head_ids) for h in hs]

    def real_rows(self) -> torch.Tensor:
        """(R, H_total, T): each real query token's distribution, for every head of every layer.

        R counts real (non-padding) query tokens of the batch; padded keys hold 0.
        """
        present = [p for p in self.probs if p is not None]
        allp = torch.cat(present, dim=1)  # (B, H_total, T, T)
        return allp.permute(0, 2, 1, 3)[self.attention_mask]  # (R, H_total, T)


class AttentionCapture:
    """Hooks that let `compute` rebuild each head's attention probabilities.

    Usage::

        with AttentionCapture(model) as cap:
            out = model(**batch)
            att = cap.compute(batch["attention_mask"], out)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = get_adapter(model)
        config = model.config
        self.head_dim = self.adapter.head_dim(config)
        self.kept = kept_heads(config)
        of = kv_head_of(config)
        # Per layer, for each kept query head, the position of its key/value head among the kept ones.
        self._kv_pos = {}
        for i, heads in self.kept.items():
            kv = sorted({of[h] for h in heads})
            self._kv_pos[i] = torch.tensor([kv.index(of[h]) for h in heads], dtype=torch.long)
        self._q: dict[int, torch.Tensor] = {}
        self._k: dict[int, torch.Tensor] = {}
        self._rotary = None  # the rotary module's output for the current batch
        self._handles = []
        rotary = self.adapter.rotary(model)
        if rotary is not None:
            self._handles.append(rotary.register_forward_hook(self._store_rotary))
        for i, layer in enumerate(self.adapter.layers(model)):
            lh = self.adapter.heads(layer)
            if lh.q is None:
                continue
            self._handles.append(lh.q.register_forward_hook(self._store(self._q, i)))
            self._handles.append(lh.k.register_forward_hook(self._store(self._k, i)))

    def _store_rotary(self, module, args, output) -> None:
        self._rotary = tuple(t.detach() for t in output)

    @staticmethod
    def _store(target: dict, i: int):
        def hook(module, args, output):
            target[i] = output.detach()

        return hook

    @torch.no_grad()
    def compute(self, attention_mask: torch.Tensor, outputs=None) -> AttentionBatch:
        """Attention of the last forward pass; clears the stored projections."""
        mask = attention_mask.bool()
        n_layers = len(self.kept)
        seq_len = mask.shape[1]
        extra = self.adapter.extra_scores(self.model, seq_len)
        key_mask = (~mask)[:, None, None, :]  # (B, 1, 1, T)
        if self.adapter.causal:
            future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).triu(1)  # (T, T)
            key_mask = key_mask | future
        probs: list[torch.Tensor | None] = []
        for i in range(n_layers):
            if i not in self._q:
                probs.append(None)
                continue
            q = self._q.pop(i).unflatten(-1, (-1, self.head_dim)).transpose(1, 2).float()  # (B, h_q, T, d)
            k = self._k.pop(i).unflatten(-1, (-1, self.head_dim)).transpose(1, 2).float()  # (B, h_kv, T, d)
            if self._rotary is not None:
                q, k = self.adapter.apply_rotary(q, k, tuple(t.to(q.device) for t in self._rotary))
            if k.shape[1] != q.shape[1]:  # grouped-query attention: each query head's own key/value head
                k = k.index_select(1, self._kv_pos[i].to(k.device))  # (B, h_q, T, d)
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5
            if extra is not None:
                scores = scores + extra[:, self.kept[i]].to(scores.dtype)
            scores = scores.masked_fill(key_mask, float("-inf"))
            # A row with every key masked (a left-padded query under a causal mask) is NaN: make it zeros.
            probs.append(torch.softmax(scores, dim=-1).nan_to_num_(0.0))
        self._rotary = None
        head_ids = [self.kept[i] if probs[i] is not None else [] for i in range(n_layers)]
        return AttentionBatch(probs=probs, head_ids=head_ids, attention_mask=mask, outputs=outputs)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._q.clear()
        self._k.clear()
        self._rotary = None

    def __enter__(self) -> AttentionCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_attention(model: nn.Module, batches: Iterable[dict]) -> Iterator[AttentionBatch]:
    """Run ``model`` over ``batches`` (no grad) and yield each batch's `AttentionBatch`.

    Batches are dicts of tensors as the model takes them (``labels`` and
    ``index`` entries are not passed to the model). Nothing is kept between
    batches.
    """
    device = next(model.parameters()).device
    with AttentionCapture(model) as cap, torch.no_grad():
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "index")}
            out = model(**inputs)
            yield cap.compute(inputs["attention_mask"], out)
