"""The cost model: MAC counts, the line fit, the cache key, the estimated share of dense."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from cahp.bench.macs import count_macs
from cahp.budget import cost, cost_measure
from cahp.budget.cost import (
    BlockCost,
    CostModelError,
    CostTable,
    cache_key,
    cost_summary,
    cost_table,
    estimated_latency,
    mac_table,
    unit_counts,
)
from cahp.budget.cost_measure import fit_linear, measure_table, measurement_widths
from cahp.model.neuron_surgery import remove_neurons
from cahp.model.surgery import remove_heads

from .tiny import FAMILIES, N_HEADS, N_LAYERS, tiny_model

D_FF = 64  # tests/tiny.py


def test_mac_table_by_hand():
    # tiny BERT: hidden D = 32, head size d = 8, d_ff = 64, batch 2 x seq 5 -> N = 10 tokens.
    t = mac_table(tiny_model("bert"), batch=2, seq=5)
    assert (t.source, t.unit, t.batch, t.seq) == ("macs", "macs", 2, 5)
    # head: q, k, v rows and o columns 4*N*D*d = 10240; scores and weighted values 2*B*T^2*d = 800.
    assert [b.per_unit for b in t.attention] == [11040.0] * N_LAYERS
    # neuron: one row of the intermediate (D) and one column of the output projection (D), per token.
    assert [b.per_unit for b in t.ffn] == [640.0] * N_LAYERS
    assert all(b.fixed == 0 and b.empty == 0 for b in (*t.attention, *t.ffn))
    assert [b.units for b in t.attention] == [N_HEADS] * N_LAYERS and [b.units for b in t.ffn] == [D_FF] * N_LAYERS
    # pooler 32x32 and classifier 32x3, once per sequence: 2 * (1024 + 96).
    assert t.rest == 2240.0
    assert t.dense_total() == 3 * (4 * 11040 + 64 * 640) + 2240 == 257600


@pytest.mark.parametrize("family", FAMILIES)
def test_mac_table_matches_count_macs(family):
    model = tiny_model(family)
    t = mac_table(model, batch=3, seq=7)
    assert t.dense_total() == count_macs(model, 3, 7)["total"]
    remove_heads(model, {0: [0, 1], 2: [3]})
    heads, neurons = unit_counts(model)
    assert heads == [2, 4, 3] and neurons == [D_FF] * N_LAYERS
    assert estimated_latency(t, heads, neurons) == pytest.approx(count_macs(model, 3, 7)["total"] / t.dense_total())


def test_fit_recovers_fixed_and_per_unit():
    widths = [128, 256, 384, 512]
    assert fit_linear(widths, [2e-3 + 5e-6 * w for w in widths]) == pytest.approx((2e-3, 5e-6))
    rng = np.random.default_rng(0)
    noisy = [2e-3 + 5e-6 * w + rng.normal(0, 1e-5) for w in widths]
    fixed, per_unit = fit_linear(widths, noisy)
    assert fixed == pytest.approx(2e-3, rel=0.05) and per_unit == pytest.approx(5e-6, rel=0.02)
    # A falling line (noise on a flat block) gives no negative cost per unit.
    assert fit_linear([1, 2], [2.0, 1.0]) == (1.5, 0.0)
    # A negative intercept is clamped and the slope refitted through the origin.
    fixed, per_unit = fit_linear([1, 2, 3], [0.5, 1.6, 2.6])
    assert fixed == 0.0 and per_unit == pytest.approx((0.5 + 3.2 + 7.8) / 14)
    with pytest.raises(CostModelError, match="2 distinct widths"):
        fit_linear([4, 4], [1.0, 2.0])


def test_measurement_widths():
    assert measurement_widths(12, 3) == [4, 8, 12]
    assert measurement_widths(1536, 2) == [768, 1536]
    assert measurement_widths(2, 3) == [1, 2]


def _settings():
    return dict(batch=1, seq=32, threads=1, widths=3, reps=20, seed=0)


def test_cache_key_changes_with_every_setting(monkeypatch):
    model = tiny_model("bert")
    base = cache_key(model, **_settings())
    assert cache_key(model, **_settings()) == base
    assert json.loads(json.dumps(base)) == base  # survives the JSON file
    for name, value in (("batch", 32), ("seq", 128), ("threads", 2), ("widths", 4), ("reps", 5), ("seed", 1)):
        assert cache_key(model, **{**_settings(), name: value}) != base, name
    assert cache_key(tiny_model("roberta"), **_settings()) != base
    assert cache_key(remove_heads(tiny_model("bert"), {1: [0]}), **_settings()) != base
    assert cache_key(tiny_model("bert", attn="sdpa"), **_settings()) != base
    compact = tiny_model("bert", attn="sdpa")
    compact_key = cache_key(compact, **_settings())
    from cahp.arch import get_adapter

    get_adapter(compact).set_attention_kernel(compact, "compact")
    assert cache_key(compact, **_settings()) not in (base, compact_key)
    assert cache_key(tiny_model("bert").double(), **_settings()) != base
    monkeypatch.setattr(cost, "machine", lambda: "another machine")
    assert cache_key(model, **_settings()) != base
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cache_key(model, **_settings()) != base


def _synthetic_table() -> CostTable:
    att = [BlockCost(4, 3e-4, 2e-4, 5e-5), BlockCost(4, 1e-4, 3e-4, 1e-4), BlockCost(4, 0.0, 1e-4, 0.0)]
    ffn = [BlockCost(8, 2e-4, 1e-5), BlockCost(8, 0.0, 4e-5), BlockCost(8, 1e-4, 2e-5)]
    return CostTable("measured", "s", 1, 32, att, ffn, rest=5e-4)


@pytest.mark.parametrize("make", [_synthetic_table, lambda: mac_table(tiny_model("mpnet"), 2, 9)])
def test_share_is_one_dense_and_falls_as_units_go(make):
    table = make()
    heads = [b.units for b in table.attention]
    neurons = [b.units for b in table.ffn]
    assert estimated_latency(table, heads, neurons) == 1.0
    units = [("h", i) for i, n in enumerate(heads) for _ in range(n)] + [
        ("f", i) for i, n in enumerate(neurons) for _ in range(n)
    ]
    random.Random(0).shuffle(units)
    last = 1.0
    for kind, layer in units:
        (heads if kind == "h" else neurons)[layer] -= 1
        share = estimated_latency(table, heads, neurons)
        assert share < last  # every unit (and every emptied block's fixed cost) costs something here
        last = share
    floor = table.rest + sum(b.empty for b in (*table.attention, *table.ffn))  # every block emptied
    assert last == pytest.approx(floor / table.dense_total())


def test_cost_summary_prices_one_unit_as_a_share_of_dense():
    t = _synthetic_table()
    t.key = {"machine": "test box"}
    macs = mac_table(tiny_model("bert"), batch=2, seq=5)
    s = cost_summary([t, macs])
    assert s["source"] == "measured" and s["shapes"] == ["1x32", "2x5"]
    one = s["per_shape"]["1x32"]
    total = t.dense_total()
    assert one["machine"] == "test box" and one["dense_total"] == pytest.approx(total)
    # means of the per-unit costs over the three layers, over the dense total
    assert one["head_share"] == pytest.approx(2e-4 / total)
    assert one["neuron_share"] == pytest.approx((1e-5 + 4e-5 + 2e-5) / 3 / total)
    two = s["per_shape"]["2x5"]
    assert two["machine"] == "" and two["head_share"] == pytest.approx(11040.0 / macs.dense_total())
    # removing one unit of a layer whose block stays non-empty saves that layer's per-unit share
    heads = [b.units for b in t.attention]
    heads[1] -= 1
    saved = 1 - estimated_latency(t, heads, [b.units for b in t.ffn])
    assert saved == pytest.approx(3e-4 / total)
    with pytest.raises(CostModelError, match="no cost table"):
        cost_summary([])


def test_share_takes_index_lists_and_mappings():
    table = _synthetic_table()
    by_counts = estimated_latency(table, [2, 4, 0], [8, 1, 3])
    by_lists = estimated_latency(table, {0: [0, 3], 1: [0, 1, 2, 3], 2: []}, {"0": 8, "1": [5], "2": [0, 1, 2]})
    assert by_lists == by_counts
    with pytest.raises(CostModelError, match="layer 2 keeps 5 heads"):
        estimated_latency(table, [4, 4, 5], [8, 8, 8])
    with pytest.raises(CostModelError, match="got 2 layers"):
        estimated_latency(table, [4, 4], [8, 8, 8])
    with pytest.raises(CostModelError, match=r"layers \[2\] are missing"):
        estimated_latency(table, {0: 1, 1: 1}, [8, 8, 8])


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_measure_table_on_a_tiny_model(family):
    model = tiny_model(family)
    before = [p.clone() for p in model.parameters()]
    table = measure_table(model, batch=2, seq=6, widths=2, reps=2, warmup=1, threads=1)
    assert table.source == "measured" and table.unit == "s" and table.n_layers == N_LAYERS
    for b in (*table.attention, *table.ffn):
        assert np.isfinite([b.fixed, b.per_unit, b.empty]).all()
        assert b.fixed >= 0 and b.per_unit >= 0 and 0 <= b.empty <= b.fixed + b.per_unit
    assert table.rest >= 0 and table.dense_total() > 0
    assert table.details["attention"][0]["widths"] == [2, 4] and table.details["ffn"][0]["widths"] == [32, 64]
    assert estimated_latency(table, *unit_counts(model)) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is not changed
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_measure_a_pruned_model_at_its_own_widths():
    model = remove_heads(tiny_model("mpnet"), {0: [0, 1], 2: [3]})
    remove_neurons(model, {1: list(range(40)), 2: list(range(60))})
    heads, neurons = unit_counts(model)
    assert heads == [2, 4, 3] and neurons == [64, 24, 4]
    table = measure_table(model, batch=1, seq=5, widths=2, reps=1, warmup=0)
    assert [b.units for b in table.attention] == [N_HEADS] * N_LAYERS and [b.units for b in table.ffn] == [D_FF] * 3
    assert [d["widths"] for d in table.details["attention"]] == [[1, 2], [2, 4], [2, 3]]
    assert [d["widths"] for d in table.details["ffn"]] == [[32, 64], [12, 24], [2, 4]]
    assert 0 < estimated_latency(table, heads, neurons) <= 1.0
    remove_neurons(model, {2: list(range(60, 64))})
    with pytest.raises(CostModelError, match="layer 2 holds 3 heads and 0 neurons"):
        measure_table(model, 1, 4, reps=1)


def test_measure_needs_two_units_per_block():
    model = remove_heads(tiny_model("bert"), {1: [0, 1, 2]})
    with pytest.raises(CostModelError, match="layer 1 holds 1 heads"):
        measure_table(model, 1, 4, reps=1)
    with pytest.raises(CostModelError, match="widths must be an integer >= 2"):
        measure_table(tiny_model("bert"), 1, 4, widths=1)


def test_cost_table_caches_measured_tables(tmp_path, monkeypatch):
    model = tiny_model("bert")
    calls = []
    real = cost_measure.measure_table

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cost_measure, "measure_table", counting)
    kw = dict(batch=1, seq=4, widths=2, reps=1, threads=1, cache_dir=tmp_path)
    first = cost_table(model, **kw)
    files = list(tmp_path.glob("cost-*.json"))
    assert len(files) == 1 and len(calls) == 1
    again = cost_table(model, **kw)
    assert len(calls) == 1 and again == first and again.key == cache_key(model, 1, 4, 1, 2, 1)
    cost_table(model, **{**kw, "seq": 5})  # another setting: another file, measured again
    assert len(calls) == 2 and len(list(tmp_path.glob("cost-*.json"))) == 2
    # A file whose stored key differs (edited, or another version) is never taken for this one.
    data = json.loads(files[0].read_text())
    data["key"]["threads"] = 7
    files[0].write_text(json.dumps(data))
    cost_table(model, **kw)
    assert len(calls) == 3 and json.loads(files[0].read_text())["key"]["threads"] == 1
    files[0].write_text("{not json")
    cost_table(model, **kw)
    assert len(calls) == 4
    cost_table(model, **kw, cache=False)
    assert len(calls) == 5


def test_cost_table_sources_and_errors():
    model = tiny_model("electra")
    assert cost_table(model, 2, 5, source="macs") == mac_table(model, 2, 5)
    with pytest.raises(CostModelError, match="unknown cost source 'flops'"):
        cost_table(model, source="flops")
    with pytest.raises(CostModelError, match="batch must be a positive integer"):
        mac_table(model, 0, 5)
    with pytest.raises(CostModelError, match="threads must be a positive integer"):
        measure_table(model, 1, 4, threads=0)
    table = mac_table(model, 2, 5)
    assert CostTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
