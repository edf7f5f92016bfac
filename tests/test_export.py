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


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_int8_agrees_with_fp32(tmp_path, family):
    """Dynamic int8 quantisation: logits within INT8_RTOL of the logit scale on padded batches, same classes."""
    from cahp.deploy.quantize import INT8_RTOL, int8_path, quantize_int8, verify_int8

    model = pruned_tiny(family)
    fp32 = export_onnx(model, tmp_path / "m.onnx")
    q = quantize_int8(fp32)
    assert q == int8_path(fp32) == tmp_path / "m.int8.onnx"
    quantized_ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert quantized_ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    check = verify_int8(model, q, shapes=((8, 16), (3, 19)), min_agreement=0.9)
    assert 0 < check["relative_diff"] <= INT8_RTOL  # rounding moved the logits, within the tolerance
    sess = onnx_session(q, threads=1)
    inputs = example_inputs(model, 5, 11, seed=7)
    with torch.no_grad():
        ref = model(**inputs).logits.numpy()
    got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(got - ref).max() <= INT8_RTOL * max(1.0, np.abs(ref).max())
    with pytest.raises(ExportError, match="logit scale"):
        verify_int8(model, q, rtol=1e-7)


def test_cli_export_int8(tmp_path, capsys):
    cahp.save_pruned(pruned_tiny("bert"), None, tmp_path / "pruned")
    out = tmp_path / "m.onnx"
    assert cli_main(["export", "--model", str(tmp_path / "pruned"), "--onnx", str(out), "--int8"]) == 0
    text = capsys.readouterr().out
    assert "int8 within tolerance of PyTorch fp32" in text and (tmp_path / "m.int8.onnx").is_file()
    assert cli_main(["export", "--model", str(tmp_path / "pruned"), "--onnx", str(out), "--int8-rtol", "0.2"]) == 2
    assert "--int8 only" in capsys.readouterr().err


@pytest.mark.integration
def test_int8_minilm_real_batch(tmp_path):
    """The real minilm-l6, pruned, on tokenised sentences: int8 logits within INT8_RTOL of the logit scale."""
    from cahp.deploy.quantize import INT8_RTOL, quantize_int8

    model, tok = cahp.load_model("minilm-l6", num_labels=5)
    cahp.remove_heads(model, {0: [0, 5], 2: list(range(12)), 4: [1, 2, 3]})
    q = quantize_int8(export_onnx(model, tmp_path / "m.onnx"))
    texts = ["a gripping, beautifully shot film", "dull and far too long", "fine", "not bad at all, if uneven"] * 8
    batch = tok(texts, padding=True, return_tensors="np")
    got = onnx_session(q, threads=1).run(["logits"], dict(batch))[0]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    assert np.abs(got - ref).max() <= INT8_RTOL * max(1.0, np.abs(ref).max())
