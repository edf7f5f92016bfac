"""FFN neuron mechanics: arch API, gates, surgery, bookkeeping, checkpoints and ONNX, for every family."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cahp
from cahp.arch import ResidualOnlyFFN, get_adapter
from cahp.deploy.onnx import example_inputs, export_onnx, onnx_session, verify_onnx
from cahp.model.checkpoint import CheckpointError, is_pruned_folder
from cahp.model.neurons import (
    KEPT_NEURONS_KEY,
    NeuronIndexError,
    NeuronRecordError,
    decode_kept_neurons,
    encode_kept_neurons,
    kept_neuron_mask,
)

from .tiny import FAMILIES, N_LAYERS, tiny_batch, tiny_model

D_FF = 64  # tiny.py's intermediate size
TOL = 1e-5
PATTERN = {0: [1, 5, 6, 7, 40], 1: list(range(D_FF)), 2: list(range(0, D_FF, 3))}  # uneven, layer 1 empty


pytestmark = pytest.mark.usefixtures("one_thread")


def biased_model(family: str, seed: int = 0):
    """A tiny model with non-zero biases (an empty FFN keeps its output bias: make it matter)."""
    model = tiny_model(family, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states (B, T, hidden), logits (B, labels)): the hidden states see every position."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


def zeroed_reference(model, neurons: dict[int, list[int]], batch):
    """Outputs of the dense ``model`` with the activations of ``neurons`` zeroed by hooks on ``act``."""
    adapter = get_adapter(model)
    handles = []
    for layer, idx in neurons.items():
        if not idx:
            continue
        index = torch.tensor(idx, dtype=torch.long)

        def hook(module, args, out, index=index):
            out = out.clone()
            out[..., index] = 0.0  # (B, T, d_ff): the activated intermediate tensor
            return out

        handles.append(adapter.ffn(adapter.layers(model)[layer]).act.register_forward_hook(hook))
    try:
        return outputs(model, batch)
    finally:
        for h in handles:
            h.remove()


def assert_close(a, b, tol=TOL):
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert float((x - y).abs().max()) <= tol


def removal_mask(neurons: dict[int, list[int]]) -> torch.Tensor:
    gates = torch.ones(N_LAYERS, D_FF)
    for layer, idx in neurons.items():
        gates[layer, idx] = 0.0
    return gates


# --- arch API ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_modules_and_activation_hook(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.intermediate_size(model.config) == D_FF
    shapes = []
    for layer in adapter.layers(model):
        ffn = adapter.ffn(layer)
        assert (ffn.inter.in_features, ffn.inter.out_features) == (32, D_FF)
        assert (ffn.out.in_features, ffn.out.out_features) == (D_FF, 32)
        ffn.act.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    batch = tiny_batch()
    outputs(model, batch)
    assert shapes == [(4, 10, D_FF)] * N_LAYERS
    # One activation module per layer: a hook on one layer sees only that layer.
    assert len({id(adapter.ffn(layer).act) for layer in adapter.layers(model)}) == N_LAYERS


# --- exactness: gate 0 == surgery == zeroed activations --------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_zero_equals_surgery_equals_zeroed_activation(family):
    model = biased_model(family)
    batch = tiny_batch()
    ref = zeroed_reference(model, PATTERN, batch)
    with cahp.neuron_gates(model, init=removal_mask(PATTERN)):
        gated = outputs(model, batch)
    assert_close(gated, ref)
    pruned = cahp.remove_neurons(copy.deepcopy(model), PATTERN)
    assert_close(outputs(pruned, batch), ref)
    # The empty FFN does no matmul: its modules are gone, only the residual stand-in remains.
    adapter = get_adapter(pruned)
    layer = adapter.layers(pruned)[1]
    assert adapter.ffn(layer).inter is None
    assert sum(isinstance(m, ResidualOnlyFFN) for m in layer.modules()) == 1
    assert not any(isinstance(m, torch.nn.Linear) and D_FF in m.weight.shape for m in layer.modules())
    assert [adapter.ffn(layer).inter.out_features for layer in adapter.layers(pruned) if adapter.ffn(layer).inter] == [
        D_FF - 5,
        D_FF - len(PATTERN[2]),
    ]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(FAMILIES),
    widths=st.lists(st.sampled_from([0, 1, 7, 33, D_FF]), min_size=N_LAYERS, max_size=N_LAYERS),
    seed=st.integers(0, 1000),
)
def test_random_uneven_widths(family, widths, seed):
    model = biased_model(family, seed=seed % 3)
    rng = np.random.default_rng(seed)
    keep = {layer: sorted(rng.choice(D_FF, size=w, replace=False).tolist()) for layer, w in enumerate(widths)}
    remove = {layer: sorted(set(range(D_FF)) - set(idx)) for layer, idx in keep.items()}
    batch = tiny_batch(seed=seed)
    ref = zeroed_reference(model, remove, batch)
    with cahp.neuron_gates(model, init=removal_mask(remove)):
        assert_close(outputs(model, batch), ref)
    before = cahp.count_parameters(model)
    pruned = cahp.keep_neurons(copy.deepcopy(model), keep)
    assert cahp.kept_neurons(pruned) == keep
    assert_close(outputs(pruned, batch), ref)
    hidden = 32
    removed = sum(len(v) for v in remove.values())
    assert before - cahp.count_parameters(pruned) == removed * (2 * hidden + 1)


# --- parameters, repeated pruning, heads together -----------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_drop_is_exact(family):
    model = biased_model(family)
    before = cahp.count_parameters(model)
    cahp.remove_neurons(model, PATTERN)
    # Per neuron: one intermediate row (hidden weights + 1 bias) and one output column (hidden weights).
    # An empty FFN keeps its output bias and LayerNorm.
    removed = sum(len(v) for v in PATTERN.values())
    assert before - cahp.count_parameters(model) == removed * (2 * 32 + 1)


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_repeated_pruning_keeps_original_numbering(family):
    model = biased_model(family)
    batch = tiny_batch()
    once = cahp.remove_neurons(copy.deepcopy(model), {0: [2, 3, 9, 10], 2: list(range(D_FF))})
    twice = cahp.remove_neurons(copy.deepcopy(model), {0: [3, 9]})
    cahp.remove_neurons(twice, {0: [2], 2: list(range(32))})
    cahp.remove_neurons(twice, {0: [10], 2: list(range(32, D_FF))})
    assert cahp.kept_neurons(twice) == cahp.kept_neurons(once)
    assert cahp.kept_neurons(twice)[0] == [0, 1] + [4, 5, 6, 7, 8] + list(range(11, D_FF))
    assert cahp.kept_neurons(twice)[2] == []
    assert_close(outputs(twice, batch), outputs(once, batch))
    with pytest.raises(NeuronIndexError, match="already removed"):
        cahp.remove_neurons(twice, {0: [3]})
    with pytest.raises(NeuronIndexError, match="already removed"):
        cahp.keep_neurons(twice, {0: [3]})
    # Gates keep the original numbering on a pruned model: gate 0 of a kept neuron == removing it too.
    with cahp.neuron_gates(twice) as gates:
        gates.values[0, 11] = 0.0
        gated = outputs(twice, batch)
    assert_close(gated, outputs(cahp.remove_neurons(twice, {0: [11]}), batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_and_neurons_together(family):
    model = biased_model(family)
    batch = tiny_batch()
    heads = {0: [1, 2], 1: [0, 1, 2, 3], 2: [3]}  # layer 1: no attention at all
    head_gate_values = torch.ones(N_LAYERS, 4)
    for layer, hs in heads.items():
        head_gate_values[layer, hs] = 0.0
    with cahp.head_gates(model, init=head_gate_values), cahp.neuron_gates(model, init=removal_mask(PATTERN)):
        gated = outputs(model, batch)
    with cahp.head_gates(model, init=head_gate_values):
        ref = zeroed_reference(model, PATTERN, batch)
    assert_close(gated, ref)
    a = cahp.remove_neurons(cahp.remove_heads(copy.deepcopy(model), heads), PATTERN)
    b = cahp.remove_heads(cahp.remove_neurons(copy.deepcopy(model), PATTERN), heads)
    assert_close(outputs(a, batch), ref)
    assert_close(outputs(b, batch), ref)
    assert cahp.count_parameters(a) == cahp.count_parameters(b)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_gradients_reach_gates(family):
    model = biased_model(family)
    cahp.remove_neurons(model, {0: [4, 5], 1: list(range(D_FF))})
    batch = tiny_batch()
    with cahp.neuron_gates(model, requires_grad=True) as gates:
        loss = model(**batch, labels=torch.tensor([0, 1, 2, 0])).loss
        loss.backward()
        grad = gates.values.grad
    assert grad.shape == (N_LAYERS, D_FF)
    kept = kept_neuron_mask(model)
    assert bool((grad[kept] != 0).all())  # every kept neuron moves the loss
    assert bool((grad[~kept] == 0).all())  # removed neurons' columns are unused
    assert not any(m._forward_pre_hooks for m in model.modules())  # no hook left behind


def test_empty_ffn_trains_in_train_mode():
    model = biased_model("bert").train()
    cahp.remove_neurons(model, {1: list(range(D_FF))})
    out = model(**tiny_batch(), labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    stand_in = next(m for m in model.modules() if isinstance(m, ResidualOnlyFFN))
    assert stand_in.training and stand_in.bias.grad is not None


# --- bookkeeping --------------------------------------------------------------


def test_record_format_round_trip():
    kept = {0: [0, 1, 2, 3, 7, 9, *range(10, 1536)], 1: [], 2: [5], 3: [4, 6, 8]}
    record = encode_kept_neurons(kept, 1536, 4)
    assert record == {
        "intermediate_size": 1536,
        "counts": [1532, 0, 1, 3],
        "indices": ["0-3,7,9-1535", "", "5", "4,6,8"],
    }
    assert json.loads(json.dumps(record)) == record
    assert decode_kept_neurons(record, 4, 1536) == kept


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ([], "must be an object"),
        ({"counts": [1], "indices": ["0"]}, "exactly the keys"),
        ({"intermediate_size": 0, "counts": [1], "indices": ["0"]}, "positive integer"),
        ({"intermediate_size": 8, "counts": [1, 1], "indices": ["0"]}, "same length"),
        ({"intermediate_size": 8, "counts": [2], "indices": ["0,x"]}, "neither an index nor a range"),
        ({"intermediate_size": 8, "counts": [3], "indices": ["5-3"]}, "runs backwards"),
        ({"intermediate_size": 8, "counts": [2], "indices": ["3,1"]}, "not strictly ascending"),
        ({"intermediate_size": 8, "counts": [2], "indices": ["1-3,3"]}, "not strictly ascending"),
        ({"intermediate_size": 8, "counts": [1], "indices": ["8"]}, "outside 0..7"),
        ({"intermediate_size": 8, "counts": [3], "indices": ["0-1"]}, "hold 2 neurons"),
        ({"intermediate_size": 8, "counts": [1], "indices": [1]}, "must be a string"),
    ],
)
def test_malformed_records_are_rejected(record, match):
    with pytest.raises(NeuronRecordError, match=match) as info:
        decode_kept_neurons(record)
    assert "\n" not in str(info.value)


def test_record_must_match_architecture():
    record = encode_kept_neurons({0: [1], 1: [2]}, 8, 2)
    with pytest.raises(NeuronRecordError, match="the architecture has 3"):
        decode_kept_neurons(record, num_layers=3)
    with pytest.raises(NeuronRecordError, match="the architecture has 16"):
        decode_kept_neurons(record, intermediate_size=16)
    with pytest.raises(NeuronRecordError, match="every layer"):
        encode_kept_neurons({0: [1]}, 8, 2)
    with pytest.raises(NeuronRecordError, match="twice"):
        encode_kept_neurons({0: [1, 1], 1: []}, 8, 2)
    with pytest.raises(NeuronRecordError, match="outside"):
        encode_kept_neurons({0: [8], 1: []}, 8, 2)


def test_dense_model_has_no_record_and_every_neuron():
    model = tiny_model("distilbert")
    assert not hasattr(model.config, KEPT_NEURONS_KEY)
    assert cahp.kept_neurons(model) == {layer: list(range(D_FF)) for layer in range(N_LAYERS)}
    assert bool(kept_neuron_mask(model).all())


@pytest.mark.parametrize(
    ("selection", "match"),
    [
        ({3: [0]}, "layer 3 does not exist"),
        ({0: [D_FF]}, f"neuron {D_FF} of layer 0 does not exist"),
        ({0: [-1]}, "neuron -1 of layer 0 does not exist"),
        ({0: [1.0]}, "not an integer"),
        ({0: [True]}, "not an integer"),
        ({"a": [1]}, "not an integer"),
        ({0: torch.tensor([0.5])}, "must be integers"),
        (torch.ones(2, D_FF, dtype=torch.bool), "bool tensor of shape"),
        ([0, 1], "mapping"),
    ],
)
def test_bad_selections_get_one_line_errors(selection, match):
    model = tiny_model("bert")
    with pytest.raises(NeuronIndexError, match=match) as info:
        cahp.remove_neurons(model, selection)
    assert "\n" not in str(info.value)
    assert not hasattr(model.config, KEPT_NEURONS_KEY)  # nothing changed


def test_mask_and_tensor_selections():
    a, b = tiny_model("mpnet"), tiny_model("mpnet")
    mask = torch.zeros(N_LAYERS, D_FF, dtype=torch.bool)
    mask[0, [3, 4]] = True
    mask[2, :] = True
    cahp.remove_neurons(a, mask)
    cahp.remove_neurons(b, {0: torch.tensor([4, 3]), 2: np.arange(D_FF)})
    assert cahp.kept_neurons(a) == cahp.kept_neurons(b)
    assert cahp.kept_neurons(a)[2] == []
    assert_close(outputs(a, tiny_batch()), outputs(b, tiny_batch()), tol=0.0)


# --- checkpoints and ONNX -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_bit_identical(tmp_path, family):
    model = biased_model(family)
    cahp.remove_heads(model, {0: [0], 2: [1, 2]})
    cahp.remove_neurons(model, PATTERN)
    cahp.save_pruned(model, None, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())[KEPT_NEURONS_KEY]
    assert saved["counts"] == [D_FF - 5, 0, D_FF - len(PATTERN[2])]
    assert saved["indices"][1] == ""
    loaded, _ = cahp.load_pruned(tmp_path / "m", attn_implementation="eager", with_tokenizer=False)
    assert cahp.kept_neurons(loaded) == cahp.kept_neurons(model)
    assert cahp.kept_heads(loaded) == cahp.kept_heads(model)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = tiny_batch()
    for x, y in zip(outputs(model, batch), outputs(loaded, batch)):
        assert torch.equal(x, y)  # same attention kernel: bit-identical


def test_neurons_only_folder_is_pruned_and_bad_record_is_a_checkpoint_error(tmp_path):
    model = biased_model("roberta")
    cahp.remove_neurons(model, {2: [0, 1]})
    cahp.save_pruned(model, None, tmp_path / "m")
    assert is_pruned_folder(tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[KEPT_NEURONS_KEY]["indices"][2] = "2-70"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="neuron 70 is outside 0..63"):
        cahp.load_pruned(tmp_path / "m", with_tokenizer=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_uneven_and_empty_ffn(tmp_path, family):
    model = biased_model(family)
    cahp.remove_heads(model, {0: [1, 2]})
    cahp.remove_neurons(model, PATTERN)
    path = export_onnx(model, tmp_path / "m.onnx")
    sess = onnx_session(path, threads=1)
    inputs = example_inputs(model, 3, 13, seed=4)
    with torch.no_grad():
        ref = model(**inputs).logits.numpy()
    got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert verify_onnx(model, path)["max_abs_diff"] < 1e-4
