"""Kwon et al.'s joint (heads + FFN neurons) Fisher search, rearrangement and tuning: synthetic tables, tiny models."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

import cahp
from cahp.budget.cost import BlockCost, CostTable, estimated_latency
from cahp.model.gates import head_gates
from cahp.model.heads import kept_mask
from cahp.model.neurons import kept_neuron_mask, neuron_gates
from cahp.selectors.fisher import fold_gates, greedy_rearrange, lsmr_solve
from cahp.selectors.joint_base import JointProblem, check_selection
from cahp.selectors.joint_fisher import (
    KwonJointFisher,
    fisher_search,
    fold_neuron_gates,
    rearrange_units,
    tune_joint_gates,
)
from cahp.stats.fisher import block_fisher_objective, capture_block, collect_joint_gate_gradients, ffn_normal_equations
from cahp.stats.neurons import collect_neuron_stats
from cahp.train.evaluate import model_inputs

from .tiny import N_HEADS, N_LAYERS, tiny_model

D_FF = 64  # tests/tiny.py's intermediate size


def table(att, ffn, rest=1.0) -> CostTable:
    return CostTable("measured", "s", 1, 32, att, ffn, rest)


def _batches(n_batches=3, seed=0, batch=5, seq=10, num_labels=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, 99, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        for i in range(batch):
            real = int(torch.randint(3, seq + 1, (1,), generator=g))
            mask[i, real:] = 0
            ids[i, real:] = 0
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.randint(0, num_labels, (batch,), generator=g)})
    return out


def tiny_table() -> CostTable:
    """The tiny models' shape with fixed costs in both blocks (an FFN that keeps a neuron pays 0.5 more)."""
    return table([BlockCost(N_HEADS, 0.4, 0.3, 0.1)] * N_LAYERS, [BlockCost(D_FF, 0.5, 0.03, 0.0)] * N_LAYERS, 1.0)


def make_problem(model, batches) -> JointProblem:
    stats = collect_neuron_stats(model, batches, heads=True, signatures=False, progress=False)
    return JointProblem(
        table=tiny_table(), head_salience=stats.head_salience.numpy(), head_fisher=stats.head_fisher.numpy(),
        neuron_salience=stats.salience.numpy(), neuron_fisher=stats.fisher.numpy(),
        heads_present=kept_mask(model).numpy(), neurons_present=kept_neuron_mask(model).numpy(),
        model=model, batches=batches)


@pytest.fixture(scope="module")
def bert():
    model = tiny_model("bert")
    batches = _batches()
    return model, batches, make_problem(model, batches)


# --- 1. search -------------------------------------------------------------------


def test_search_picks_the_fisher_optimal_split_by_hand():
    # Heads cost 1, neurons 0.25, no fixed costs, dense 6: a share of 0.5 leaves 3.
    t = table([BlockCost(2, 0.0, 1.0)] * 2, [BlockCost(4, 0.0, 0.25)] * 2, rest=0.0)
    hf = np.array([[10.0, 1.0], [0.5, 0.2]])
    nf = np.array([[3.0, 3.0, 3.0, 3.0], [0.1, 0.1, 0.1, 0.1]])
    # n = 1: 10 + all 8 neurons (12.4) = 22.4; n = 2: 11 + layer 0's four (12) = 23; n = 3: 11.5, no neuron.
    found = fisher_search(t, hf, nf, np.ones((2, 2), bool), np.ones((2, 4), bool), 0.5)
    assert (found.n_heads, found.n_neurons) == (2, 4)
    assert found.heads.tolist() == [[True, True], [False, False]]
    assert found.neurons.tolist() == [[True] * 4, [False] * 4]
    assert found.kept_fisher == pytest.approx(23.0) and found.pruned_fisher == pytest.approx(0.7 + 0.4)
    # A fixed cost of 0.75 on layer 1's FFN: n = 1 now fits only 1 + 4 * 0.25 + (0.75 + 0.25) = 3 -> 5 neurons.
    t.ffn[1] = BlockCost(4, 0.75, 0.25)
    found = fisher_search(t, hf, nf, np.ones((2, 2), bool), np.ones((2, 4), bool), 0.5 * 6.75 / 6)
    assert found.n_heads == 2 and found.n_neurons == 4  # 23 against 10 + 12.1 = 22.1


def _brute_force(t, hf, nf, hp, npres, share):
    """The search as the brief states it: for each n, add neurons one by one while the share fits."""
    hr = sorted(zip(*np.nonzero(hp)), key=lambda u: (-hf[u], u))
    nr = sorted(zip(*np.nonzero(npres)), key=lambda u: (-nf[u], u))
    best = None
    for n in range(1, len(hr) + 1):
        heads = np.zeros(hf.shape[0], int)
        for layer, _ in hr[:n]:
            heads[layer] += 1
        neurons = np.zeros(nf.shape[0], int)
        if estimated_latency(t, heads.tolist(), neurons.tolist()) > share:
            continue
        k = 0
        for layer, _ in nr:
            neurons[layer] += 1
            if estimated_latency(t, heads.tolist(), neurons.tolist()) > share:
                break
            k += 1
        value = sum(hf[u] for u in hr[:n]) + sum(nf[u] for u in nr[:k])
        if best is None or value > best[0] + 1e-12:
            best = (value, n, k)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_search_equals_the_unit_by_unit_scan(seed):
    rng = np.random.default_rng(seed)
    L, H, F = 3, 3, 5
    t = table([BlockCost(H, *rng.uniform(0.1, 1.0, 2), 0.05) for _ in range(L)],
              [BlockCost(F, *rng.uniform(0.05, 1.0, 2), 0.0) for _ in range(L)], rest=rng.uniform(0, 1))
    hf, nf = rng.exponential(size=(L, H)), rng.exponential(size=(L, F))
    hp, npres = rng.uniform(size=(L, H)) < 0.8, rng.uniform(size=(L, F)) < 0.8
    hp[0, 0] = True
    for share in (0.4, 0.6, 0.85, 1.0):
        expected = _brute_force(t, hf, nf, hp, npres, share)
        if expected is None:
            with pytest.raises(ValueError, match="no split"):
                fisher_search(t, hf, nf, hp, npres, share)
            continue
        found = fisher_search(t, hf, nf, hp, npres, share)
        assert (found.n_heads, found.n_neurons) == expected[1:]
        assert found.kept_fisher == pytest.approx(expected[0])
        assert not (found.heads & ~hp).any() and not (found.neurons & ~npres).any()
        assert estimated_latency(t, found.heads.sum(1).tolist(), found.neurons.sum(1).tolist()) <= share + 1e-12


def test_search_errors():
    t = table([BlockCost(2, 1.0, 1.0)] * 2, [BlockCost(4, 0.0, 0.25)] * 2, rest=1.0)
    ones_h, ones_n = np.ones((2, 2)), np.ones((2, 4))
    with pytest.raises(ValueError, match="no split of heads and neurons reaches a share of 0.2000"):
        fisher_search(t, ones_h, ones_n, ones_h > 0, ones_n > 0, 0.2)  # one head: (1 + 2 + 1) / 7
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\]"):
        fisher_search(t, ones_h, ones_n, ones_h > 0, ones_n > 0, 1.5)
    with pytest.raises(ValueError, match="holds no head"):
        fisher_search(t, ones_h, ones_n, ones_h < 0, ones_n > 0, 0.9)
    with pytest.raises(ValueError, match="must match the cost table's 2 layers"):
        fisher_search(t, np.ones((3, 2)), ones_n, np.ones((3, 2), bool), ones_n > 0, 0.9)


# --- 2. rearrangement ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_rearrange_units_is_greedy_rearrange_vectorised(seed):
    g = torch.Generator().manual_seed(seed)
    U, B = 12, 6
    grads = torch.randn(B, U, generator=g, dtype=torch.float64)
    keep = torch.rand(U, generator=g) < 0.5
    present = torch.rand(U, generator=g) < 0.9
    new = rearrange_units(keep, grads, present)
    assert torch.equal(new, greedy_rearrange(keep, grads, present))
    assert int(new.sum()) == int((keep & present).sum()) and not (new & ~present).any()
    before = block_fisher_objective(keep[None], grads[:, None], present[None])
    assert block_fisher_objective(new[None], grads[:, None], present[None]) >= before - 1e-12


def test_rearrange_units_swaps_a_cancelling_unit_in():
    # Columns: units; rows: batches. Pruned unit 2 is cancelled by kept unit 0: prune 0, keep 3 instead.
    grads = torch.tensor([[-1.0, 1.5, 0.9, 0.6], [-1.0, -1.5, 0.9, -0.6]])
    keep = torch.tensor([True, True, False, False])
    new = rearrange_units(keep, grads)
    assert new.tolist() == [False, True, False, True]
    assert torch.equal(new, greedy_rearrange(keep, grads))
    assert block_fisher_objective(keep[None], grads[:, None]) == pytest.approx(-0.5 * (1.5**2 + 0.3**2) / 2)
    assert block_fisher_objective(new[None], grads[:, None]) == pytest.approx(-0.5 * 0.01)


def test_method_share_counts_rearrangement_and_determinism(bert):
    model, batches, problem = bert
    for share in (0.5, 0.7, 0.9):
        searched = KwonJointFisher(rearrange=False).select(share, problem)
        sel = KwonJointFisher().select(share, problem)
        for s in (searched, sel):
            assert check_selection(s, problem, share, "fisher") <= share + 1e-12
        assert sel.counts(N_LAYERS) == searched.counts(N_LAYERS)  # per-layer counts fixed by rearrangement
        assert sel.info["n_heads"] == sum(sel.counts(N_LAYERS)[0]) >= 1
        assert sel.info["objective"] >= sel.info["objective_searched"] - 1e-12
        assert sel.info["pruned_fisher_searched"] == pytest.approx(searched.info["pruned_fisher"])
        assert sel.info["pruned_fisher"] >= sel.info["pruned_fisher_searched"] - 1e-12  # the search's optimum
        assert sel.head_gates is None and sel.neuron_gates is None
        again = KwonJointFisher().select(share, problem)
        assert again.to_dict() == sel.to_dict()
    # the gradient pass matches the statistics pass (same loss, same gates) and is cached
    method = KwonJointFisher()
    gh, gn = method.batch_gradients(problem)
    assert gh.shape == (len(batches), N_LAYERS, N_HEADS) and gn.shape == (len(batches), N_LAYERS, D_FF)
    np.testing.assert_allclose(gh.square().mean(0).numpy(), problem.head_fisher, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(gn.square().mean(0).numpy(), problem.neuron_fisher, rtol=1e-5, atol=1e-12)
    assert method.batch_gradients(problem)[0] is gh
    assert all(p.requires_grad for p in model.parameters())
    assert method.settings() == {"rearrange": True, "tune": False, "tune_first_layer": 1, "cls_last": True}


def test_method_errors(bert):
    _, _, problem = bert
    with pytest.raises(ValueError, match="no split"):
        KwonJointFisher().select(0.05, problem)
    bare = copy.copy(problem)
    bare.model = None
    with pytest.raises(ValueError, match="rearrangement needs the joint problem's model"):
        KwonJointFisher().select(0.7, bare)
    with pytest.raises(ValueError, match="mask tuning needs the joint problem's model"):
        KwonJointFisher(rearrange=False, tune=True).select(0.7, bare)
    assert check_selection(KwonJointFisher(rearrange=False).select(0.7, bare), bare, 0.7) <= 0.7


# --- 3. tuning and folding --------------------------------------------------------


def test_ffn_normal_equations_equal_the_explicit_system(bert):
    model, batches, _ = bert
    layer = 1
    neurons = [0, 3, 5, 8, 13, 40]
    hg = torch.ones(N_LAYERS, N_HEADS)
    hg[0, 1] = 0.0
    ng = torch.ones(N_LAYERS, D_FF)
    ng[0, :20] = 0.0
    ng[layer] = 0.0
    ng[layer, neurons] = 1.0
    ata, atb = ffn_normal_equations(model, layer, neurons, hg, ng, batches)
    out = cahp.get_adapter(model).ffn(cahp.get_adapter(model).layers(model)[layer]).out
    A_ata, A_atb = torch.zeros_like(ata), torch.zeros_like(atb)
    with torch.no_grad():
        for batch in batches:
            real = batch["attention_mask"].bool()
            h_t, x_t = capture_block(model, layer, "ffn", batch, "cpu")
            teacher = (out(x_t) + h_t)[real].double()
            h_s, x_s = capture_block(model, layer, "ffn", batch, "cpu", hg, ng)
            cols = [(x_s[real][:, n:n + 1].double() * out.weight[:, n].double()).flatten() for n in neurons]
            A = torch.stack(cols, 1)  # (N*D, m), built explicitly
            b = (teacher - out.bias.double() - h_s[real].double()).flatten()
            A_ata += A.T @ A
            A_atb += A.T @ b
    torch.testing.assert_close(ata, A_ata, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(atb, A_atb, rtol=1e-9, atol=1e-9)
    # the damped solve never fits worse than the gates at 1
    sol, ok = lsmr_solve(ata, atb, damp=1.0)
    assert ok

    def q(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        return float(x @ ata @ x - 2 * x @ atb)

    assert q(sol) <= q(np.ones(len(neurons))) + 1e-9


def _ffn_error(model, layer, head_values, neuron_values, batches) -> float:
    """Squared distance of the student's pre-LayerNorm FFN output of ``layer`` to the dense model's, real tokens."""
    adapter = cahp.get_adapter(model)
    out = adapter.ffn(adapter.layers(model)[layer]).out
    err = 0.0
    with torch.no_grad():
        for batch in batches:
            real = batch["attention_mask"].bool()
            h_t, x_t = capture_block(model, layer, "ffn", batch, "cpu")
            h_s, x_s = capture_block(model, layer, "ffn", batch, "cpu", head_values, neuron_values)
            student = out(x_s * neuron_values[layer].float()) + h_s
            err += float((student - out(x_t) - h_t)[real].double().square().sum())
    return err


def test_tuning_lowers_the_block_error_and_stops_out_of_range(bert):
    model, batches, _ = bert
    nm = torch.rand(N_LAYERS, D_FF, generator=torch.Generator().manual_seed(0)) < 0.5
    hm = torch.ones(N_LAYERS, N_HEADS, dtype=torch.bool)
    hm[1, 0] = False
    # Tiny random models have a small AᵀA: a damping of 1 (the default, as for heads) would hold the gates at 1.
    hg, ng, info = tune_joint_gates(model, hm, nm, batches, damp=1e-3)
    assert info == {"tuned_head_layers": [1, 2], "tuned_neuron_layers": [0, 1, 2], "stopped": None}
    assert torch.equal(hg[0], hm[0].float())  # layer 0's heads are not tuned
    assert not ng[~nm].any() and not hg[~hm].any()
    # layer 0's FFN is the first block tuned: its own least-squares fit, nothing upstream changed
    tuned = _ffn_error(model, 0, hg, ng, batches)
    assert tuned < 0.95 * _ffn_error(model, 0, hm.float(), nm.float(), batches)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # and it is the least-squares optimum (the damping's pull is far below these steps)
        moved = ng.clone()
        moved[0] += 0.05 * torch.randn(D_FF, generator=g) * nm[0]
        assert tuned < _ffn_error(model, 0, hg, moved, batches)
    hg2, ng2, info2 = tune_joint_gates(model, hm, nm, batches, damp=1e-3, max_scale=1.01)
    assert info2["stopped"] == {"layer": 0, "kind": "neurons", "reason": "scale out of range"}
    assert torch.equal(ng2, nm.float()) and torch.equal(hg2, hm.float())


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_tuned_selection_folds_into_the_pruned_model(family):
    model = tiny_model(family)
    batches = _batches(seed=1)
    problem = make_problem(model, batches)
    method = KwonJointFisher(tune=True)
    sel = method.select(0.6, problem)
    check_selection(sel, problem, 0.6, family)
    hm, nm = sel.masks((N_LAYERS, N_HEADS), (N_LAYERS, D_FF))
    assert sel.head_gates.shape == hm.shape and sel.neuron_gates.shape == nm.shape
    assert not sel.head_gates[~hm].any() and not sel.neuron_gates[~nm].any()  # 0 off the kept units
    tuning = sel.info["tuning"]
    assert tuning["tuned_neuron_layers"] and 0 not in tuning["tuned_head_layers"]
    tuned = list(tuning["tuned_neuron_layers"])
    assert not torch.equal(sel.neuron_gates[tuned], nm[tuned].float())  # the fit moved some gate
    batch = batches[0]
    with torch.no_grad(), head_gates(model, init=sel.head_gates), neuron_gates(model, init=sel.neuron_gates):
        gated = model(**model_inputs(batch)).logits
    pruned = copy.deepcopy(model)
    cahp.keep_heads(pruned, hm)
    cahp.keep_neurons(pruned, nm)
    fold_gates(pruned, sel.head_gates)
    fold_neuron_gates(pruned, sel.neuron_gates)
    with torch.no_grad():
        folded = pruned(**model_inputs(batch)).logits
    assert (folded - gated).abs().max() <= 1e-5
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_fold_neuron_gates_on_a_pruned_model_and_bad_shape():
    model = tiny_model("bert", seed=2)
    batch = _batches(n_batches=1)[0]
    rng = np.random.default_rng(0)
    nm = torch.from_numpy(rng.uniform(size=(N_LAYERS, D_FF)) < 0.5)
    nm[2] = False  # an empty FFN: nothing to fold there
    gates = torch.from_numpy(rng.uniform(0.5, 1.5, size=(N_LAYERS, D_FF))).float() * nm
    with torch.no_grad(), neuron_gates(model, init=gates):
        gated = model(**model_inputs(batch)).logits
    cahp.keep_neurons(model, nm)
    with torch.no_grad():
        fold_neuron_gates(model, gates)
        assert (model(**model_inputs(batch)).logits - gated).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"expected \(3, 64\)"):
        fold_neuron_gates(model, torch.ones(N_LAYERS, D_FF + 1))


def test_joint_gradients_need_a_batch_and_leave_the_model_as_it_was():
    model = tiny_model("distilbert").train()
    with pytest.raises(ValueError, match="at least one batch"):
        collect_joint_gate_gradients(model, [])
    gh, gn = collect_joint_gate_gradients(model, _batches(n_batches=2))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert gh.dtype == gn.dtype == torch.float64 and gn.abs().sum() > 0
    assert list(itertools.chain(gh.shape, gn.shape)) == [2, N_LAYERS, N_HEADS, 2, N_LAYERS, D_FF]


def test_tuned_joint_fisher_settings_name_the_solver():
    from cahp.selectors.fisher import TUNE_SOLVER

    tuned = KwonJointFisher(tune=True).settings()
    assert tuned["solver"] == TUNE_SOLVER and tuned["tune"] is True
    assert "solver" not in KwonJointFisher().settings()
