"""ONNX export of pruned models: uneven heads, empty layers, dynamic batch and sequence axes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import cahp
from cahp.cli import main as cli_main
from cahp.deploy.onnx import ExportError, example_inputs, export_onnx, input_names, onnx_session, verify_onnx

from .tiny import FAMILIES, tiny_model

PATTERN = {0: [1], 1: [0, 1, 2, 3], 2: [0, 3]}  # uneven, layer 1 empty


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine idle-waiting threads cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pruned_tiny(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero biases, as in real checkpoints (an empty layer keeps its output bias)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return cahp.remove_heads(model, PATTERN)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_pytorch_on_two_shapes(tmp_path, family):
    model = pruned_tiny(family)
    path = export_onnx(model, tmp_path / "m.onnx")
    sess = onnx_session(path, threads=1)
    names = [i.name for i in sess.get_inputs()]
    assert names == input_names(model)
    assert ("token_type_ids" in names) == (family in ("bert", "roberta", "electra"))
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    for batch, seq, seed in ((1, 5, 0), (4, 23, 1)):  # neither is the export example (2 x 8)
        inputs = example_inputs(model, batch, seq, seed=seed)
        with torch.no_grad():
            ref = model(**inputs).logits.numpy()
        got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
        assert got.shape == ref.shape == (batch, 3)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    check = verify_onnx(model, path)
    assert check["max_abs_diff"] < 1e-4 and len(check["shapes"]) == 2


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_export_axes_are_dynamic_and_model_unchanged(tmp_path, family):
    model = pruned_tiny(family)
    kept = cahp.kept_heads(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert cahp.kept_heads(model) == kept
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left


def test_verify_detects_mismatch(tmp_path):
    model = pruned_tiny("bert")
    path = export_onnx(model, tmp_path / "m.onnx")
    other = pruned_tiny("bert")
    with torch.no_grad():
        other.classifier.bias.add_(1.0)
    with pytest.raises(ExportError, match="differ"):
        verify_onnx(other, path)


def test_cli_export_pruned_folder(tmp_path, capsys):
    model = pruned_tiny("mpnet")
    cahp.save_pruned(model, None, tmp_path / "pruned")
    rc = cli_main(["export", "--model", str(tmp_path / "pruned"), "--onnx", str(tmp_path / "out" / "m.onnx")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "heads per layer [3, 0, 2]" in out and "matches PyTorch" in out
    assert (tmp_path / "out" / "m.onnx").is_file()


def test_cli_export_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["export", "--model", str(tmp_path / "missing"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["export", "--model", "minilm-l6", "--onnx", str(tmp_path / "m.txt")]) == 2
    assert ".onnx" in capsys.readouterr().err
