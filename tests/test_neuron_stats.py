"""Neuron statistics: the correlation accumulator, gate gradients and activation signatures on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cahp.arch import get_adapter
from cahp.model.neuron_surgery import remove_neurons
from cahp.model.neurons import neuron_gates
from cahp.stats.neurons import (
    ActivationCorrelationAccumulator,
    NeuronStats,
    collect_neuron_stats,
    correlation_distance,
)
from cahp.stats.salience import gate_gradients

from .tiny import N_LAYERS, tiny_batch, tiny_model

D_FF = 64  # tests/tiny.py


def labelled(seed: int, batch: int = 4, seq: int = 10) -> dict:
    b = tiny_batch(seed=seed, batch=batch, seq=seq)
    b["labels"] = torch.arange(batch) % 3
    return b


def batches(n: int = 3) -> list[dict]:
    return [labelled(seed) for seed in range(n)]


@pytest.mark.parametrize("block", [512, 3])
def test_accumulator_matches_numpy_and_streams(block, monkeypatch):
    monkeypatch.setattr(ActivationCorrelationAccumulator, "BLOCK", block)  # 3: uneven blocks of 7 columns
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7)) * rng.uniform(0.1, 3, size=7) + 100.0  # a large mean: centring matters
    x[:, 3] = 0.4 * x[:, 1] - 2 * x[:, 5] + rng.normal(scale=0.01, size=300)
    ref = np.corrcoef(x, rowvar=False)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        acc = ActivationCorrelationAccumulator(7, product_dtype=dtype)
        for part in np.split(x, [1, 40, 41, 200]):  # uneven batches, one of a single row
            acc.add_batch(torch.tensor(part, dtype=torch.float32 if dtype == torch.float32 else torch.float64))
        r = acc.result()
        assert acc.count == 300
        np.testing.assert_allclose(r["correlation"].numpy(), ref, atol=tol)
        np.testing.assert_allclose(r["mean"].numpy(), x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(r["std"].numpy(), x.std(0), rtol=1e-4 if dtype == torch.float32 else 1e-9)
        assert not r["constant"].any()
    acc.add_batch(torch.zeros(0, 7, dtype=torch.float64))  # a batch without real tokens changes nothing
    assert acc.count == 300
    with pytest.raises(ValueError, match=r"shape \(rows, 7\)"):
        acc.add_batch(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="seen no row"):
        ActivationCorrelationAccumulator(2).result()


def test_raw_sums_add_up_across_shards(monkeypatch):
    monkeypatch.setattr(ActivationCorrelationAccumulator, "BLOCK", 2)
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(90, 5)) + 30.0)
    whole = ActivationCorrelationAccumulator(5, torch.float64)
    whole.add_batch(x)
    parts = [ActivationCorrelationAccumulator(5, torch.float64) for _ in range(2)]
    parts[0].add_batch(x[:20])
    parts[1].add_batch(x[20:50])
    parts[1].add_batch(x[50:])  # each shard has its own shift
    raws = [p.raw() for p in parts]
    merged = ActivationCorrelationAccumulator(5)
    merged.load_raw(raws[0][0] + raws[1][0], raws[0][1] + raws[1][1], parts[0].count + parts[1].count)
    torch.testing.assert_close(whole.raw()[1], x.T @ x)
    for key in ("correlation", "mean", "std"):
        torch.testing.assert_close(merged.result()[key], whole.result()[key], atol=1e-10, rtol=1e-10)


def test_constant_neurons_and_distance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4))
    x[:, 2] = 0.0  # dead
    x[:, 0] = 1.5  # constant, not zero
    x[:, 3] = -x[:, 1]  # perfectly anti-correlated with neuron 1
    acc = ActivationCorrelationAccumulator(4, product_dtype=torch.float64)
    acc.add_batch(torch.tensor(x))
    r = acc.result()
    assert r["constant"].tolist() == [True, False, True, False]
    corr = r["correlation"]
    assert torch.equal(corr.diagonal(), torch.ones(4, dtype=torch.float64))
    assert corr[0, 1] == 0 and corr[2, 3] == 0 and corr[1, 3] == pytest.approx(-1.0)
    d = correlation_distance(corr, r["constant"])
    assert torch.equal(d, d.T) and torch.equal(d.diagonal(), torch.zeros(4, dtype=torch.float64))
    assert d[1, 3] == pytest.approx(0.0, abs=1e-12)  # the sign of a correlation does not matter
    assert torch.all(d[0] == 0) and torch.all(d[:, 2] == 0)  # constant neurons sit next to every neuron
    assert torch.all((d >= 0) & (d <= 1))


def _real_activations(model, batch_list) -> list[np.ndarray]:
    """Per layer, activations (real tokens, d_ff) read by a plain forward hook: the reference."""
    adapter = get_adapter(model)
    rows = [[] for _ in range(N_LAYERS)]
    handles = []
    mask = {}
    for i, layer in enumerate(adapter.layers(model)):
        def hook(module, args, out, i=i):
            rows[i].append(out[mask["m"]].double().numpy())

        handles.append(adapter.ffn(layer).act.register_forward_hook(hook))
    with torch.no_grad():
        for b in batch_list:
            mask["m"] = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return [np.concatenate(r) for r in rows]


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_signatures_are_correlations_over_real_tokens(family):
    model = tiny_model(family)
    data = batches()
    stats = collect_neuron_stats(model, data, product_dtype=torch.float64, progress=False)
    acts = _real_activations(model, data)
    assert stats.tokens == sum(int(b["attention_mask"].sum()) for b in data) == acts[0].shape[0]
    assert stats.examples == 12 and stats.batches == 3
    for layer in range(N_LAYERS):
        assert stats.neuron_ids[layer] == list(range(D_FF))
        np.testing.assert_allclose(stats.correlation[layer].numpy(), np.corrcoef(acts[layer], rowvar=False),
                                   atol=1e-9)
        assert stats.distance(layer).shape == (D_FF, D_FF)


def test_padding_does_not_change_signatures():
    model = tiny_model("roberta")
    short = labelled(0, seq=8)
    long = {k: v.clone() for k, v in short.items()}
    pad = 5
    long["input_ids"] = torch.cat([short["input_ids"], torch.full((4, pad), 1)], dim=1)  # roberta pads with 1
    long["attention_mask"] = torch.cat([short["attention_mask"], torch.zeros(4, pad, dtype=torch.long)], dim=1)
    a = collect_neuron_stats(model, [short], progress=False, product_dtype=torch.float64)
    b = collect_neuron_stats(model, [long], progress=False, product_dtype=torch.float64)
    assert a.tokens == b.tokens
    for layer in range(N_LAYERS):
        torch.testing.assert_close(a.correlation[layer], b.correlation[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(a.salience, b.salience, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_gate_gradients_match_finite_differences_and_head_salience(family):
    model = tiny_model(family).double()
    data = batches(2)
    stats = collect_neuron_stats(model, data, progress=False)
    # The heads' part is exactly what the heads-only salience pass gives.
    heads = gate_gradients(model, data, progress=False)
    torch.testing.assert_close(stats.head_salience, heads["salience"])
    torch.testing.assert_close(stats.head_fisher, heads["fisher"])

    def loss(batch, layer, neuron, value):
        with torch.no_grad(), neuron_gates(model) as gates:
            gates.values[layer, neuron] = value
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss.item()

    eps = 1e-5
    for layer, neuron in ((0, 3), (1, 40), (2, 63)):
        g = [(loss(b, layer, neuron, 1 + eps) - loss(b, layer, neuron, 1 - eps)) / (2 * eps) for b in data]
        assert stats.salience[layer, neuron].item() == pytest.approx(np.mean(np.abs(g)), rel=1e-5, abs=1e-12)
        assert stats.fisher[layer, neuron].item() == pytest.approx(np.mean(np.square(g)), rel=1e-5, abs=1e-12)
    assert stats.salience.shape == (N_LAYERS, D_FF) and stats.salience.dtype == torch.float64
    assert float(stats.salience.min()) >= 0 and float(stats.salience.max()) > 0


def test_pruned_model_and_model_left_as_it_was():
    model = tiny_model("electra")
    remove_neurons(model, {0: list(range(10, 64)), 1: list(range(64))})
    model.train()
    frozen = model.classifier.dense.weight
    frozen.requires_grad_(False)
    stats = collect_neuron_stats(model, batches(2), heads=False, progress=False)
    assert stats.neuron_ids[0] == list(range(10)) and stats.neuron_ids[1] == [] and len(stats.neuron_ids[2]) == 64
    assert stats.correlation[0].shape == (10, 10) and stats.correlation[1] is None
    assert stats.head_salience is None
    assert torch.all(stats.salience[0, 10:] == 0) and torch.all(stats.salience[1] == 0)
    assert float(stats.salience[0, :10].min()) > 0
    with pytest.raises(ValueError, match="layer 1 has no neuron correlations"):
        stats.distance(1)
    assert model.training and not frozen.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not frozen)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_masks_signatures_off_and_state_round_trip():
    model = tiny_model("bert")
    mask = torch.ones(N_LAYERS, D_FF)
    mask[2, :32] = 0
    stats = collect_neuron_stats(model, batches(2), signatures=False, neuron_mask=mask, progress=False)
    assert stats.correlation == [] and stats.tokens == 0
    # Gated-off neurons of the last layer still have gradients (their gate can be raised again).
    assert float(stats.salience[2, :32].max()) > 0
    full = collect_neuron_stats(model, batches(2), progress=False)
    again = NeuronStats.from_state_dict(full.state_dict())
    assert again.neuron_ids == full.neuron_ids and again.tokens == full.tokens
    for layer in range(N_LAYERS):
        assert torch.equal(again.distance(layer), full.distance(layer))
    assert torch.equal(again.salience, full.salience) and torch.equal(again.head_fisher, full.head_fisher)


def test_memory_does_not_grow_with_the_sample():
    model = tiny_model("bert")
    sizes = []
    for n in (1, 4):
        stats = collect_neuron_stats(model, batches(n), progress=False)
        sizes.append(sum(t.numel() for t in stats.correlation))
    assert sizes[0] == sizes[1] == N_LAYERS * D_FF * D_FF
