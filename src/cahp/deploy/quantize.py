"""int8 ONNX: onnxruntime dynamic quantisation of an exported model, checked against PyTorch fp32.

Dynamic quantisation stores the weights of every MatMul / Gemm as int8 (one
scale per tensor) and quantises activations on the fly, per call, to uint8:
no calibration data, and the graph keeps its dynamic batch and sequence axes.
Rounding then moves the logits a little. `verify_int8` measures how much on
padded random batches and accepts the file when

    max |int8 logit - fp32 logit| <= INT8_RTOL * max(1, max |fp32 logit|)

over each batch (the tolerance scales with the logits because rounding error
grows with the activations it rounds; the floor of 1 keeps near-zero logits,
as of an untrained head, from turning noise into failures). The share of rows
whose predicted class (argmax) is unchanged is reported beside it; pass
``min_agreement`` to enforce it (meaningful for a trained classifier only:
an untrained head's logits are near ties).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cahp.deploy.onnx import VERIFY_SHAPES, ExportError, example_inputs, onnx_session

log = logging.getLogger(__name__)

INT8_RTOL = 0.1


class _DropHint(logging.Filter):
    """onnxruntime logs a generic "consider pre-processing" hint on the root logger for every model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def int8_path(fp32_path: str | os.PathLike) -> Path:
    """Where the int8 copy of ``fp32_path`` goes: ``m.onnx`` -> ``m.int8.onnx``."""
    p = Path(fp32_path)
    return p.with_name(f"{p.stem}.int8{p.suffix}")


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """Write an int8 (dynamically quantised) copy of the ONNX file ``src`` to ``dst`` (default `int8_path`)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ExportError("onnxruntime is not installed: pip install 'cahp[onnx]'") from None
    src = Path(src)
    dst = Path(dst) if dst is not None else int8_path(src)
    if not src.is_file():
        raise ExportError(f"{src} does not exist: export the fp32 model first")
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".onnx", dir=dst.parent)
    os.close(fd)
    try:
        # Signed int8 weights: onnxruntime's CPU kernels for them are the fast path on x86 and ARM.
        hint = _DropHint()
        logging.getLogger().addFilter(hint)
        try:
            quantize_dynamic(str(src), tmp, weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().removeFilter(hint)
        os.replace(tmp, dst)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"int8 quantisation of {src} failed: {e.__class__.__name__}: {e}") from e
    log.info("quantised %s to int8: %s", src, dst)
    return dst


def verify_int8(
    model: nn.Module,
    path: str | os.PathLike,
    shapes=VERIFY_SHAPES,
    rtol: float = INT8_RTOL,
    min_agreement: float | None = None,
    threads: int | None = None,
) -> dict:
    """Compare the int8 file at ``path`` with ``model`` in PyTorch fp32 on padded batches of each (batch, seq) shape.

    Returns ``{"max_abs_diff", "relative_diff", "argmax_agreement", "shapes": [...]}``
    (relative: the difference over ``max(1, max |fp32 logit|)``, worst batch);
    raises `ExportError` when it exceeds ``rtol`` or (with ``min_agreement``)
    fewer than that share of the rows keep their predicted class.
    """
    sess = onnx_session(path, threads=threads)
    wanted = {i.name for i in sess.get_inputs()}
    m = copy.deepcopy(model).to("cpu").eval()
    per_shape, same, rows = [], 0, 0
    for i, (b, s) in enumerate(shapes):
        inputs = example_inputs(m, b, s, seed=200 + i)
        with torch.no_grad():
            ref = m(**inputs).logits.numpy()
        got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items() if k in wanted})[0]
        diff = float(np.abs(got - ref).max())
        scale = max(1.0, float(np.abs(ref).max()))
        per_shape.append({"batch": b, "seq": s, "max_abs_diff": diff, "relative_diff": diff / scale})
        same += int((got.argmax(-1) == ref.argmax(-1)).sum())
        rows += b
    result = {
        "max_abs_diff": max(r["max_abs_diff"] for r in per_shape),
        "relative_diff": max(r["relative_diff"] for r in per_shape),
        "argmax_agreement": same / rows,
        "shapes": per_shape,
    }
    if not result["relative_diff"] <= rtol:
        raise ExportError(
            f"int8 logits differ from fp32 by {result['relative_diff']:.3f} of the logit scale (> {rtol}) on {path}"
        )
    if min_agreement is not None and result["argmax_agreement"] < min_agreement:
        raise ExportError(
            f"int8 predictions agree with fp32 on {result['argmax_agreement']:.0%} of rows (< {min_agreement:.0%})"
        )
    return result


__all__ = ["INT8_RTOL", "int8_path", "quantize_int8", "verify_int8"]
