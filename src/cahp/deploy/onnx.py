"""ONNX export of dense and pruned models (uneven heads and empty layers included).

The exported graph takes ``input_ids``, ``attention_mask`` (and
``token_type_ids`` for the families whose forward has them: BERT, RoBERTa,
ELECTRA) with dynamic batch and sequence axes, and returns ``logits``. Every
layer keeps its own head count; a layer without heads exports as its residual
path only. `verify_onnx` runs the file in onnxruntime on inputs of other shapes
than the export example (with padding) and compares with PyTorch.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from cahp.arch import get_adapter

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
VERIFY_SHAPES = ((1, 7), (3, 19))


class ExportError(ValueError):
    """The export failed or its outputs do not match PyTorch."""


def input_names(model: nn.Module) -> list[str]:
    return get_adapter(model).input_names(model.config)


class _LogitsOnly(nn.Module):
    """Positional inputs in `input_names` order -> logits (what the ONNX graph computes)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs)), return_dict=True).logits


def example_inputs(model: nn.Module, batch: int, seq: int, seed: int = 0, pad: bool = True) -> dict:
    """Random ids; with ``pad``, row i > 0 ends in i padded tokens (at least one real token)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    pad_id = getattr(model.config, "pad_token_id", 0) or 0
    if pad:
        for i in range(1, batch):
            real = max(1, seq - i)
            mask[i, real:] = 0
            ids[i, real:] = pad_id
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in input_names(model):
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return out


def export_onnx(
    model: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET, kernel: str | None = "eager"
) -> Path:
    """Export ``model`` (dense or pruned by cahp) to ``path``; returns the path.

    The model is not changed: a CPU copy in eval mode is traced (TorchScript
    exporter, ``dynamo=False``) with ``kernel`` attention ("eager" traces the
    plain matmul/softmax graph that onnxruntime fuses well; None keeps the
    model's own). The example input has padding, so the traced graph keeps the
    padding-mask path for every input. Written atomically.
    """
    get_adapter(model)  # unsupported family -> clear error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to("cpu").eval()
    if kernel is not None:
        get_adapter(m).set_attention_kernel(m, kernel)
    names = input_names(m)
    example = example_inputs(m, batch=2, seq=8)
    wrapper = _LogitsOnly(m, names).eval()
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch"}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python-level shape logic
            torch.onnx.export(
                wrapper,
                tuple(example[n] for n in names),
                tmp,
                input_names=names,
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        os.replace(tmp, path)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"ONNX export failed: {e.__class__.__name__}: {e}") from e
    log.info("exported %s to %s (opset %d)", type(model).__name__, path, opset)
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session with ``threads`` intra-op threads (torch's count by default)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed: pip install 'cahp[onnx]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # No busy-waiting between calls: idle pool threads would steal the cores from whatever runs next.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    shapes=VERIFY_SHAPES,
    atol: float = 1e-4,
    threads: int | None = None,
) -> dict:
    """Compare onnxruntime with PyTorch on padded inputs of each (batch, seq) shape.

    Returns ``{"max_abs_diff": float, "shapes": [...]}``; raises `ExportError`
    when the difference exceeds ``atol``.
    """
    sess = onnx_session(path, threads=threads)
    wanted = {i.name for i in sess.get_inputs()}
    m = copy.deepcopy(model).to("cpu").eval()
    worst = 0.0
    per_shape = []
    for i, (b, s) in enumerate(shapes):
        inputs = example_inputs(m, b, s, seed=100 + i)
        with torch.no_grad():
            ref = m(**inputs).logits.numpy()
        got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items() if k in wanted})[0]
        if got.shape != ref.shape:
            raise ExportError(f"onnx logits have shape {got.shape} for batch {b} x seq {s}, PyTorch {ref.shape}")
        diff = float(abs(got - ref).max())
        per_shape.append({"batch": b, "seq": s, "max_abs_diff": diff})
        worst = max(worst, diff)
    if not worst <= atol:
        raise ExportError(f"onnx outputs differ from PyTorch by {worst:.2e} (> {atol:.0e}) on {path}")
    return {"max_abs_diff": worst, "shapes": per_shape}


__all__ = ["ExportError", "export_onnx", "input_names", "onnx_session", "verify_onnx"]
