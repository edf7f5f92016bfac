"""`head_magnitudes` (the magnitude baseline) on encoders and on grouped-query decoders (seconds)."""

from __future__ import annotations

import pytest
import torch

import cahp
from cahp.arch import get_adapter
from cahp.model.heads import kept_heads, model_shape
from cahp.selectors.simple import head_magnitudes

from .test_decoder import tiny_decoder
from .tiny import tiny_model


@torch.no_grad()
def per_head_reference(model) -> torch.Tensor:
    """The encoder formula: every head's own q/k/v rows (with biases) and o columns, one slice per head."""
    adapter = get_adapter(model)
    d = adapter.head_dim(model.config)
    out = torch.zeros(*model_shape(model.config), dtype=torch.float64)
    for layer_idx, layer in enumerate(adapter.layers(model)):
        lh = adapter.heads(layer)
        if lh.o is None:
            continue
        for pos, h in enumerate(kept_heads(model.config)[layer_idx]):
            rows = slice(pos * d, (pos + 1) * d)
            sq = lh.o.weight[:, rows].double().square().sum()
            for proj in (lh.q, lh.k, lh.v):
                sq += proj.weight[rows].double().square().sum()
                if proj.bias is not None:
                    sq += proj.bias[rows].double().square().sum()
            out[layer_idx, h] = float(sq.sqrt())
    return out


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_encoders_keep_their_per_head_values(family):
    model = tiny_model(family)
    assert torch.equal(head_magnitudes(model), per_head_reference(model))
    cahp.keep_heads(model, {0: [0, 3], 1: [2], 2: [1, 2, 3]})
    mags = head_magnitudes(model)
    assert torch.equal(mags, per_head_reference(model))
    assert mags[0, 1] == 0 and mags[1, 2] > 0


def _scale_k_rows(model, layer: int, kv: int, factor: float) -> None:
    adapter = get_adapter(model)
    d = adapter.head_dim(model.config)
    lh = adapter.heads(adapter.layers(model)[layer])
    with torch.no_grad():
        lh.k.weight[kv * d:(kv + 1) * d] *= factor


def test_a_query_head_counts_its_own_groups_kv_rows():
    model = tiny_decoder(kv_heads=3)  # 6 query heads, groups {0,1} {2,3} {4,5}
    before = head_magnitudes(model)
    assert before.shape == (3, 6) and bool((before > 0).all())
    _scale_k_rows(model, layer=1, kv=1, factor=10.0)
    after = head_magnitudes(model)
    changed = (after != before).nonzero().tolist()
    assert changed == [[1, 2], [1, 3]]  # the query heads of group 1 of layer 1, and no other
    assert bool((after[1, 2:4] > before[1, 2:4]).all())


def test_grouped_query_value_is_q_o_of_the_head_and_k_v_of_its_group():
    model = tiny_decoder(kv_heads=2)  # groups {0,1,2} {3,4,5}
    adapter = get_adapter(model)
    d = adapter.head_dim(model.config)
    lh = adapter.heads(adapter.layers(model)[0])
    h, kv = 4, 1
    with torch.no_grad():
        q_o = (lh.q.weight[h * d:(h + 1) * d].double().square().sum()
               + lh.o.weight[:, h * d:(h + 1) * d].double().square().sum())
        k_v = sum(p.weight[kv * d:(kv + 1) * d].double().square().sum() for p in (lh.k, lh.v))
    assert head_magnitudes(model)[0, h].item() == pytest.approx(float((q_o + k_v).sqrt()), rel=1e-12)


def test_pruned_decoder_reads_kept_kv_heads_by_position():
    model = tiny_decoder(kv_heads=3)
    cahp.keep_heads(model, {0: [0, 1, 4], 1: [5], 2: [2, 3, 4, 5]})  # layer 0 keeps KV heads 0 and 2
    before = head_magnitudes(model)
    assert before[0, 2] == 0 and before[1, 0] == 0 and bool(before[1, 5] > 0)
    _scale_k_rows(model, layer=0, kv=1, factor=10.0)  # position 1 among layer 0's kept KV heads: KV head 2
    after = head_magnitudes(model)
    assert (after != before).nonzero().tolist() == [[0, 4]]
