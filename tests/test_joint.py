"""Joint selection on synthetic statistics: per-layer representatives and the global allocation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cahp.budget.cost import BlockCost, CostTable, estimated_latency
from cahp.selectors.joint import (
    JointSelectionError,
    JointSelector,
    allocate,
    cut_linkage,
    greedy_order,
    head_selection,
    layer_linkage,
    neuron_selection,
    select_layers,
    select_units,
)
from cahp.stats.neurons import ActivationCorrelationAccumulator, correlation_distance


def grouped_neurons(groups: int = 4, per_group: int = 6, seed: int = 0):
    """Distances of neurons that copy one of ``groups`` latent signals (plus noise), neuron i in group i % groups."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(500, groups))
    n = groups * per_group
    x = np.stack([latent[:, i % groups] * rng.choice([-1, 1]) + 0.1 * rng.normal(size=500) for i in range(n)], 1)
    acc = ActivationCorrelationAccumulator(n, torch.float64)
    acc.add_batch(torch.tensor(x))
    r = acc.result()
    return correlation_distance(r["correlation"], r["constant"]).numpy(), np.arange(n) % groups


def test_cut_gives_exactly_k_nested_clusters():
    D, _ = grouped_neurons()
    n = D.shape[0]
    Z = layer_linkage(D)
    previous = None
    for k in range(1, n + 1):
        labels = cut_linkage(Z, n, k)
        assert sorted(set(labels.tolist())) == list(range(k))
        if previous is not None:  # every cluster at k lies inside one cluster at k - 1
            for c in range(k):
                assert len(set(previous[labels == c].tolist())) == 1
        previous = labels
    with pytest.raises(JointSelectionError, match="into 0 clusters"):
        cut_linkage(Z, n, 0)


def test_one_representative_per_group_the_most_salient():
    D, group = grouped_neurons()
    rng = np.random.default_rng(3)
    salience = rng.uniform(size=len(group))
    salience[group == 0] += 10  # a ranking by salience alone would keep group 0 only
    kept = select_units(D, salience, 4)
    assert sorted(group[kept].tolist()) == [0, 1, 2, 3]
    for g in range(4):
        members = np.flatnonzero(group == g)
        assert members[np.argmax(salience[members])] in kept
    assert np.array_equal(select_units(D, salience, 4), kept)  # deterministic


def test_kept_sets_are_nested_and_edges():
    D, group = grouped_neurons(groups=3, per_group=5, seed=1)
    salience = np.random.default_rng(0).uniform(size=len(group))
    Z = layer_linkage(D)
    sets = [set(select_units(D, salience, k, Z=Z).tolist()) for k in range(len(group) + 1)]
    assert sets[0] == set() and sets[-1] == set(range(len(group)))
    assert all(len(s) == k for k, s in enumerate(sets))
    assert all(a <= b for a, b in zip(sets, sets[1:]))
    for method in ("complete", "single"):
        assert sorted(group[select_units(D, salience, 3, method=method)].tolist()) == [0, 1, 2]
    with pytest.raises(JointSelectionError, match="cannot keep 16 of 15"):
        select_units(D, salience, 16)
    with pytest.raises(JointSelectionError, match="unknown linkage 'ward'"):
        layer_linkage(D, "ward")
    with pytest.raises(JointSelectionError, match=r"shape \(15,\)"):
        select_units(D, salience[:3], 2)


def test_select_layers_maps_original_ids():
    D, group = grouped_neurons(groups=2, per_group=3)
    s = np.arange(6, dtype=float)
    ids = [[10, 11, 12, 13, 14, 15], [], [0, 2, 4, 6, 8, 9]]
    out = select_layers([D, None, D], [s, np.zeros(0), s], [2, 0, 6], ids=ids)
    assert out[1] == [] and out[2] == ids[2]
    assert len(out[0]) == 2 and {group[i - 10] for i in out[0]} == {0, 1}
    assert out[0] == [14, 15]  # the most salient of each group: positions 4 and 5
    with pytest.raises(JointSelectionError, match="same layers"):
        select_layers([D], [s, s], [1, 1])


def table(att, ffn, rest=1.0) -> CostTable:
    return CostTable("measured", "s", 1, 32, att, ffn, rest)


def test_allocation_prefers_cheap_salience_per_second():
    # Two layers alike except that layer 1's neurons cost 4x as much: they go first.
    t = table([BlockCost(2, 1.0, 1.0, 0.2)] * 2, [BlockCost(8, 0.5, 0.25, 0.0), BlockCost(8, 0.5, 1.0, 0.0)])
    sal_h = np.full((2, 2), 100.0)  # heads far too salient to go
    sal_n = np.tile(np.linspace(1, 2, 8), (2, 1))
    dense = allocate(t, sal_h, sal_n, 1.0)
    assert dense.heads == [2, 2] and dense.neurons == [8, 8] and dense.share == 1.0
    a = allocate(t, sal_h, sal_n, 0.8)
    assert a.share <= 0.8 + 1e-12 and a.share == estimated_latency(t, a.heads, a.neurons)
    assert a.heads == [2, 2] and a.neurons[1] < a.neurons[0]
    # Nothing more fits: putting back any single neuron would pass the target.
    for layer in range(2):
        if 1 <= a.neurons[layer] < 8:
            more = list(a.neurons)
            more[layer] += 1
            assert estimated_latency(t, a.heads, more) > 0.8


def test_block_with_little_salience_and_a_large_fixed_cost_is_emptied():
    t = table([BlockCost(2, 0.1, 0.1, 0.05)] * 2, [BlockCost(4, 3.0, 0.1, 0.0), BlockCost(4, 0.1, 0.1, 0.0)], rest=0.5)
    sal_n = np.array([[0.01, 0.01, 0.02, 0.01], [1.0, 1.0, 1.0, 1.0]])
    a = allocate(t, np.ones((2, 2)), sal_n, 0.5)
    assert a.neurons[0] == 0 and a.neurons[1] == 4
    assert a.share <= 0.5


def test_heads_only_min_heads_present_masks_and_errors():
    t = table([BlockCost(4, 1.0, 1.0, 0.0)] * 3, [BlockCost(6, 0.0, 1.0)] * 3, rest=0.0)
    rng = np.random.default_rng(0)
    sal_h = rng.uniform(size=(3, 4))
    a = allocate(t, sal_h, None, 0.7)  # dense: 3 * (1 + 4) + 18 = 33
    assert a.neurons == [6, 6, 6] and sum(a.heads) >= 1 and a.share <= 0.7
    with pytest.raises(JointSelectionError, match="cannot be reached"):
        allocate(t, sal_h, None, 0.6)  # one head left costs (1 + 1) + 18 FFN = 20 / 33
    one = allocate(t, sal_h, None, 20.0 / 33 + 1e-9)
    assert sum(one.heads) == 1 and one.share == pytest.approx(20.0 / 33)  # min_heads: never the last head
    present = np.ones((3, 6), dtype=bool)
    present[0, :3] = False
    b = allocate(t, sal_h, rng.uniform(size=(3, 6)), 0.7, neurons_present=present)
    assert b.neurons[0] <= 3 and b.share <= 0.7
    dense_share = estimated_latency(t, [4, 4, 4], [3, 6, 6])
    c = allocate(t, None, rng.uniform(size=(3, 6)), 1.0, neurons_present=present)
    assert c.neurons == [3, 6, 6] and c.share == pytest.approx(dense_share)
    with pytest.raises(JointSelectionError, match=r"target share must be in \(0, 1\]"):
        allocate(t, sal_h, None, 0.0)
    with pytest.raises(JointSelectionError, match="heads salience must be"):
        allocate(t, np.ones((2, 4)), None, 0.5)
    with pytest.raises(JointSelectionError, match="NaN"):
        allocate(t, np.full((3, 4), np.nan), None, 0.5)
    sal_n = rng.uniform(size=(3, 6))
    assert allocate(t, sal_h, sal_n, 0.5) == allocate(t, sal_h.copy(), sal_n.copy(), 0.5)  # deterministic


def test_neuron_selection_from_stats_of_a_tiny_model():
    from cahp.model.neuron_surgery import remove_neurons
    from cahp.stats.neurons import collect_neuron_stats

    from .tiny import tiny_batch, tiny_model

    model = remove_neurons(tiny_model("bert"), {1: list(range(64))})
    batch = tiny_batch(seed=0)
    batch["labels"] = torch.tensor([0, 1, 2, 0])
    stats = collect_neuron_stats(model, [batch], heads=False, progress=False)
    kept = neuron_selection(stats, [5, 0, 64])
    assert kept[1] == [] and kept[2] == list(range(64)) and len(kept[0]) == 5
    pos = select_units(stats.distance(0).numpy(), stats.salience[0].numpy(), 5)
    assert kept[0] == pos.tolist()
    with pytest.raises(JointSelectionError, match="layer 1 holds no unit: it cannot keep 3"):
        neuron_selection(stats, [5, 3, 64])
    with pytest.raises(JointSelectionError, match="lists 2 layers"):
        neuron_selection(stats, [5, 3])


def test_head_selection_within_layers():
    # Heads (layer, head): layer 0 holds 0..3, layer 1 holds 1 and 2 (pruned before).
    head_ids = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    D = np.ones((6, 6)) - np.eye(6)
    D[0, 1] = D[1, 0] = D[2, 3] = D[3, 2] = 0.1  # layer 0: pairs {0, 1} and {2, 3}
    salience = np.array([[0.1, 0.5, 0.9, 0.2], [0.0, 0.3, 0.4, 0.0]])
    kept = head_selection(D, head_ids, salience, [2, 1])
    assert kept == {0: [1, 2], 1: [2]}
    with pytest.raises(JointSelectionError, match="head_ids lists 5 heads"):
        head_selection(D, head_ids[:5], salience, [2, 1])


def test_greedy_order_skips_duplicates_of_kept_units_and_otherwise_follows_salience():
    D, group = grouped_neurons()  # 4 groups of near-copies: distances within a group ~0, across ~1
    salience = np.linspace(2.0, 1.0, len(group))  # unit 0 most salient, each group spread over the ranking
    order = greedy_order(D, salience)
    assert sorted(order.tolist()) == list(range(len(group)))  # a permutation
    assert order[0] == 0  # the most salient first
    assert sorted(group[order[:4]].tolist()) == [0, 1, 2, 3]  # then one of each group before any copy
    # Units at the typical distance from each other: the order is the salience order (ties: lower index).
    flat = np.ones((5, 5)) - np.eye(5)
    s = np.array([0.3, 0.9, 0.1, 0.9, 0.5])
    assert greedy_order(flat, s).tolist() == [1, 3, 4, 0, 2]
    assert greedy_order(np.zeros((3, 3)), np.array([1.0, 3.0, 2.0])).tolist() == [1, 2, 0]  # no scale: salience
    assert np.array_equal(greedy_order(D, salience), order)  # deterministic
    with pytest.raises(JointSelectionError, match=r"shape \(24,\)"):
        greedy_order(D, salience[:3])


def test_joint_selector_greedy_rule_keeps_a_prefix_of_the_order_per_layer():
    from cahp.model.neuron_surgery import remove_neurons
    from cahp.selectors.joint import Allocation
    from cahp.stats.neurons import collect_neuron_stats

    from .tiny import tiny_batch, tiny_model

    model = remove_neurons(tiny_model("bert"), {1: list(range(64))})
    batch = tiny_batch(seed=0)
    batch["labels"] = torch.tensor([0, 1, 2, 0])
    stats = collect_neuron_stats(model, [batch], heads=False, progress=False)
    n_layers = len(stats.neuron_ids)
    head_ids = [(layer, h) for layer in range(n_layers) for h in range(4)]
    D = np.ones((len(head_ids), len(head_ids))) - np.eye(len(head_ids))
    hs = np.random.default_rng(0).uniform(size=(n_layers, 4))
    sel = JointSelector(D, head_ids, hs, stats, within="greedy")
    heads, neurons = sel.select(Allocation(heads=[2] + [4] * (n_layers - 1), neurons=[5, 0] + [64] * (n_layers - 2),
                                           share=0.5))
    assert heads[0] == sorted(np.argsort(-hs[0])[:2].tolist())  # equidistant heads: the two most salient
    assert neurons[1] == [] and len(neurons[0]) == 5
    order = greedy_order(stats.distance(0).numpy(), stats.salience[0].double().numpy())
    assert neurons[0] == sorted(stats.neuron_ids[0][p] for p in order[:5])
    smaller = sel.select(Allocation(heads=[1] + [4] * (n_layers - 1), neurons=[3, 0] + [64] * (n_layers - 2),
                                    share=0.6))
    assert set(smaller[1][0]) <= set(neurons[0]) and set(smaller[0][0]) <= set(heads[0])  # nested
    with pytest.raises(JointSelectionError, match="unknown within-layer rule 'best'"):
        JointSelector(D, head_ids, hs, stats, within="best")
