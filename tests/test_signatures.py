"""Signatures, distances and salience on tiny models."""

from __future__ import annotations

import torch

import cahp
from cahp.model.gates import head_gates
from cahp.selectors.cahp import select_heads
from cahp.stats.salience import gate_gradients
from cahp.stats.signatures import collect_signatures

from .tiny import N_HEADS, N_LAYERS, tiny_model


def _sentences(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 99, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g) for _ in range(n)]


def _pad(seqs, length):
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(len(seqs), dtype=torch.long)}


def test_padding_invariance():
    model = tiny_model("bert", attn="sdpa")
    seqs = _sentences()
    tight = [_pad(seqs[:3], 8), _pad(seqs[3:], 8)]
    loose = [_pad(seqs[:2], 20), _pad(seqs[2:], 31)]  # other batching, much more padding
    a = collect_signatures(model, tight, kinds=("js", "hellinger", "skl"), progress=False)
    b = collect_signatures(model, loose, kinds=("js", "hellinger", "skl"), progress=False)
    assert a.rows == b.rows == sum(len(s) for s in seqs)
    # Hellinger takes sqrt(1 - BC) near 0, which magnifies float32 rounding (~4e-6 seen); js/skl ~3e-8.
    for kind, atol in (("js", 1e-6), ("hellinger", 2e-5), ("skl", 1e-6)):
        torch.testing.assert_close(a.distances[kind], b.distances[kind], atol=atol, rtol=0)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-6, rtol=0)


def test_duplicate_heads_distance_zero_and_same_cluster():
    model = tiny_model("bert")
    # random init gives near-uniform attention; sharpen it so heads differ, then make
    # head 1 of layer 0 an exact copy of head 0 (same q and k rows)
    s = model.bert.encoder.layer[0].attention.self
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8)
            layer.attention.self.key.weight.mul_(8)
        for lin in (s.query, s.key):
            lin.weight[8:16] = lin.weight[0:8]
            lin.bias[8:16] = lin.bias[0:8]
    sig = collect_signatures(model, [_pad(_sentences(), 10)], kinds=("js", "jm"), progress=False)
    assert sig.head_ids[:2] == [(0, 0), (0, 1)]
    for kind in ("js", "jm"):
        D = sig.distances[kind]
        assert D[0, 1].item() < 1e-3 * D[D > 0].median().item()
        assert torch.equal(D, D.T) and (D.diagonal() == 0).all()
    chosen = select_heads(sig.distances["js"].numpy(), torch.ones(12).numpy(), k=11, method="agglomerative")
    assert not {0, 1} <= set(chosen.tolist())  # the two copies share one cluster: only one is kept


def test_statistics_size_does_not_grow():
    model = tiny_model("bert")
    small = collect_signatures(model, [_pad(_sentences(0), 10)], progress=False)
    big = collect_signatures(model, [_pad(_sentences(i), 10) for i in range(8)], progress=False)
    assert big.rows > 4 * small.rows
    assert small.distances["js"].shape == big.distances["js"].shape == (N_LAYERS * N_HEADS,) * 2


def test_signatures_of_pruned_model_use_original_ids():
    model = tiny_model("mpnet")
    cahp.remove_heads(model, {0: [1], 1: [0, 1, 2, 3]})
    sig = collect_signatures(model, [_pad(_sentences(), 10)], progress=False)
    assert sig.head_ids == [(0, 0), (0, 2), (0, 3), (2, 0), (2, 1), (2, 2), (2, 3)]


def test_salience_matches_finite_differences():
    model = tiny_model("bert").double()
    batch = _pad(_sentences(), 10)
    batch["labels"] = torch.tensor([0, 1, 2, 0, 1, 2])
    res = gate_gradients(model, [batch], progress=False)
    eps = 1e-6
    for layer, head in [(0, 0), (1, 2), (2, 3)]:
        vals = []
        for sign in (1, -1):
            g = torch.ones(N_LAYERS, N_HEADS, dtype=torch.float64)
            g[layer, head] += sign * eps
            with head_gates(model, init=g), torch.no_grad():
                vals.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"]).loss.item())
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert abs(abs(fd) - res["salience"][layer, head].item()) < 1e-6
        assert abs(fd**2 - res["fisher"][layer, head].item()) < 1e-8
    assert all(p.requires_grad for p in model.parameters())


def test_split_batches_bound_the_pass_and_keep_the_statistics(monkeypatch):
    model = tiny_model("bert", attn="sdpa")
    seqs = _sentences(1, n=12)
    whole = [_pad(seqs, 16)]
    a = collect_signatures(model, whole, kinds=("js", "skl"), progress=False, max_attention_cells=None)
    seen = []
    real_split = cahp.stats.signatures.split_batches

    def spy(batches, max_cells):
        for b in real_split(batches, max_cells):
            seen.append(b["attention_mask"].shape)
            yield b

    monkeypatch.setattr(cahp.stats.signatures, "split_batches", spy)
    # 12 heads; 12 * 3 * 8**2 cells: at most three 8-token sentences per piece
    b = collect_signatures(model, whole, kinds=("js", "skl"), progress=False, max_attention_cells=12 * 3 * 8 * 8)
    assert len(seen) >= 4 and all(n * w * w <= 3 * 64 for n, w in seen)
    assert a.rows == b.rows and a.examples == b.examples == 12
    for kind in ("js", "skl"):
        torch.testing.assert_close(a.distances[kind], b.distances[kind], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-6, rtol=0)
