"""The hidden-state fidelity that chooses CAHP's split where every held-out loss is at chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cahp.model.heads import kept_mask
from cahp.model.neurons import neuron_shape
from cahp.pipelines.joint import score_units
from cahp.train.evaluate import hidden_fidelity, predict, predict_hidden
from tests.tiny import FAMILIES, tiny_batch, tiny_model


def _batches(n_batches: int = 2):
    out, start = [], 0
    for i in range(n_batches):
        b = tiny_batch(seed=i)
        n = len(b["input_ids"])
        out.append({**b, "index": torch.arange(start, start + n), "labels": torch.arange(n) % 3})
        start += n
    return out, start


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_hidden_matches_predict_and_the_base_models_last_state_and_leaves_no_hooks(family):
    model = tiny_model(family)
    batches, n = _batches()
    preds, logits, hidden = predict_hidden(model, batches, n)
    ref_preds, ref_logits = predict(model, batches, n, progress=False)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
    assert (preds == ref_preds).all()
    with torch.no_grad():
        want = model.base_model(**{k: batches[0][k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    torch.testing.assert_close(hidden[0], want)
    assert not any(m._forward_hooks for m in model.modules())  # the timing refuses hooked models


def test_fidelity_counts_real_tokens_only():
    batches, _ = _batches()
    ref = [torch.randn(*b["input_ids"].shape, 16) for b in batches]
    assert hidden_fidelity(ref, ref, batches) == pytest.approx(1.0)
    noisy = [r.clone() for r in ref]
    for r, b in zip(noisy, batches, strict=True):
        r[~b["attention_mask"].bool()] = torch.randn(int((b["attention_mask"] == 0).sum()), 16)  # padding only
    assert hidden_fidelity(noisy, ref, batches) == pytest.approx(1.0)
    flipped = [-r for r in ref]
    assert hidden_fidelity(flipped, ref, batches) == pytest.approx(-1.0)
    # by hand: every real token of the first batch's first row at cosine 0, the rest at 1
    half = [r.clone() for r in ref]
    real = batches[0]["attention_mask"][0].bool()
    half[0][0, real] = 0.0
    half[0][0, real, 0] = 1.0
    ref[0][0, real] = 0.0
    ref[0][0, real, 1] = 1.0
    total = sum(int(b["attention_mask"].sum()) for b in batches)
    assert hidden_fidelity(half, ref, batches) == pytest.approx(1 - int(real.sum()) / total)
    with pytest.raises(ValueError, match="one state per batch"):
        hidden_fidelity(ref[:1], ref, batches)


def test_score_units_fidelity_is_one_dense_and_falls_as_units_go():
    model = tiny_model("bert")
    batches, n = _batches()
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    ref = predict_hidden(model, batches, n)[2]
    heads = torch.ones(kept_mask(model).shape)
    neurons = torch.ones(neuron_shape(model.config))
    dense = score_units(model, heads, neurons, batches, labels, reference=ref)
    assert dense.fidelity == pytest.approx(1.0)
    neurons_cut = neurons.clone()
    neurons_cut[:, ::2] = 0
    cut = score_units(model, heads, neurons_cut, batches, labels, reference=ref)
    assert cut.fidelity < dense.fidelity - 1e-5  # small: a random tiny FFN adds little to the residual stream
    heads_cut = heads.clone()
    heads_cut[:, 1:] = 0
    more = score_units(model, heads_cut, neurons_cut, batches, labels, reference=ref)
    assert more.fidelity < cut.fidelity
    assert score_units(model, heads, neurons, batches, labels).fidelity is None  # no reference: not measured
    assert not any(m._forward_hooks for m in model.modules())
