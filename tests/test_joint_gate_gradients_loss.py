"""`collect_joint_gate_gradients(loss_fn=)`: the default is the labelled loss, bit for bit; a caller's loss (no
labels read) gives that loss's gate gradients, checked by finite differences (tiny random model, seconds).
`LabelFreeJointFisher`, which passes the embedding loss, is tested in tests/test_compare_embedding_ffn.py."""

from __future__ import annotations

import pytest
import torch

from cahp.model.gates import head_gates
from cahp.model.neurons import neuron_gates
from cahp.stats import fisher
from cahp.stats.fisher import collect_joint_gate_gradients
from cahp.train.evaluate import labelled_loss, model_inputs

from .tiny import N_HEADS, N_LAYERS, tiny_model

D_FF = 64  # tests/tiny.py's intermediate size


def _batches(n_batches=2, seed=0, batch=4, seq=8, labels=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, 99, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0  # one padded row
        b = {"input_ids": ids, "attention_mask": mask}
        if labels:
            b["labels"] = torch.randint(0, 3, (batch,), generator=g)
        out.append(b)
    return out


def _logit_energy(model, batch, device):
    """A loss that reads no labels: mean squared logit."""
    return model(**model_inputs(batch, device)).logits.square().mean()


def test_default_is_the_labelled_loss_bit_for_bit():
    torch.manual_seed(0)
    model = tiny_model("bert")
    batches = _batches()
    default = collect_joint_gate_gradients(model, batches)
    given = collect_joint_gate_gradients(model, batches, loss_fn=labelled_loss)
    assert all(torch.equal(a, b) for a, b in zip(default, given))
    other = collect_joint_gate_gradients(model, batches, loss_fn=_logit_energy)
    assert not torch.equal(other[0], default[0])  # the loss is really the one given


def test_a_callers_loss_gives_its_gate_gradients(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the labelled loss was used")

    monkeypatch.setattr(fisher, "labelled_loss", refuse)
    torch.manual_seed(1)
    model = tiny_model("distilbert").double().train()
    batches = _batches(labels=False)
    gh, gn = collect_joint_gate_gradients(model, batches, loss_fn=_logit_energy)
    assert gh.shape == (2, N_LAYERS, N_HEADS) and gn.shape == (2, N_LAYERS, D_FF) and gh.dtype == torch.float64
    assert model.training and all(p.requires_grad for p in model.parameters())  # left as it was

    def loss_at(heads=None, neurons=None, batch=batches[1]):
        hv, nv = torch.ones(N_LAYERS, N_HEADS), torch.ones(N_LAYERS, D_FF)
        if heads is not None:
            hv[heads[0], heads[1]] += heads[2]
        if neurons is not None:
            nv[neurons[0], neurons[1]] += neurons[2]
        model.eval()  # the gradients are of the deployed function (no dropout)
        with torch.no_grad(), head_gates(model, init=hv), neuron_gates(model, init=nv):
            return float(_logit_energy(model, batch, torch.device("cpu")))

    eps = 1e-3  # central differences of a smooth loss in float64 model weights
    fd_head = (loss_at(heads=(1, 2, eps)) - loss_at(heads=(1, 2, -eps))) / (2 * eps)
    fd_neuron = (loss_at(neurons=(2, 5, eps)) - loss_at(neurons=(2, 5, -eps))) / (2 * eps)
    # the values are small (about 1e-7 and 1e-9 on this model): a relative tolerance only
    assert fd_head == pytest.approx(float(gh[1, 1, 2]), rel=1e-3)
    assert fd_neuron == pytest.approx(float(gn[1, 2, 5]), rel=1e-3)
    with pytest.raises(ValueError, match="at least one batch"):
        collect_joint_gate_gradients(model, [], loss_fn=_logit_energy)

