"""Scoring an ONNX file like a PyTorch model: `OnnxClassifier` predicts on the batches evaluation makes.

`cahp.train.evaluate.predict` takes a torch module or any object with a
``logits(inputs) -> Tensor`` method; `OnnxClassifier` is such an object over an
onnxruntime CPU session. So `cahp.train.evaluate.evaluate_task` scores an fp32
or int8 export (`cahp.deploy.onnx`, `cahp.deploy.quantize`) with the batching
of the PyTorch model (the same length buckets, each batch right-padded to its
longest row), the same metrics and the same bootstrap intervals: an fp32 export
makes the PyTorch model's predictions, an int8 one shows what rounding costs.

The file is checked when it is opened: it must exist, load in onnxruntime,
take integer inputs among ``input_ids``, ``attention_mask`` and
``token_type_ids`` (``input_ids`` among them) and return ``logits``. A file
from elsewhere with other inputs or outputs is refused with one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from cahp.data.batching import MODEL_INPUTS
from cahp.deploy.onnx import ExportError, onnx_session

log = logging.getLogger(__name__)

#: onnxruntime's names of the integer element types an id or mask input may have.
INTEGER_TYPES = ("tensor(int64)", "tensor(int32)")


class OnnxModelError(ValueError):
    """The ONNX file is missing, unreadable, or does not take and return what a cahp export does."""


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0] if text else ''}"


class OnnxClassifier:
    """An exported sequence classifier (fp32 or int8) that predicts on tokenised batches.

    Args:
        path: the ``.onnx`` file (as `cahp export` writes it).
        threads: onnxruntime intra-op threads (default: torch's thread count).

    Attributes:
        input_names: the graph's inputs, in its order.
        num_labels: the width of ``logits`` when the graph fixes it, else None.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"ONNX file {self.path} does not exist")
        try:
            self.session = onnx_session(self.path, threads=threads)
        except ExportError:
            raise  # onnxruntime itself is missing: that message names the fix
        except Exception as e:
            raise OnnxModelError(f"{self.path} is not an ONNX model onnxruntime can load ({_first_line(e)})") from None
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        unknown = [i.name for i in inputs if i.name not in MODEL_INPUTS]
        if unknown or "input_ids" not in self.input_names:
            raise OnnxModelError(
                f"{self.path} takes inputs {self.input_names}; a cahp export takes input_ids, attention_mask "
                "and, for some families, token_type_ids"
            )
        not_int = [f"{i.name} ({i.type})" for i in inputs if i.type not in INTEGER_TYPES]
        if not_int:
            raise OnnxModelError(f"{self.path} takes non-integer inputs {', '.join(not_int)}: not a token classifier")
        self._dtypes = {i.name: np.int32 if i.type == "tensor(int32)" else np.int64 for i in inputs}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if "logits" not in outputs:
            raise OnnxModelError(f"{self.path} returns {sorted(outputs)}, not logits: not a cahp classifier export")
        shape = outputs["logits"].shape  # [batch, labels]: the label axis is static in an export
        self.num_labels = shape[-1] if len(shape) == 2 and isinstance(shape[-1], int) else None

    def logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(batch, num_labels)`` float logits for one batch of ``input_ids`` / ``attention_mask`` / ...

        The graph gets the inputs it declares; a ``token_type_ids`` the batch
        lacks is all zeros (what the PyTorch model assumes without them), any
        other missing input is an error. Inputs the graph does not take are
        left out (a family without segment ids).
        """
        ids = inputs.get("input_ids")
        if ids is None:
            raise OnnxModelError("the batch has no input_ids")
        feed = {}
        for name in self.input_names:
            value = inputs.get(name)
            if value is None:
                if name != "token_type_ids":
                    raise OnnxModelError(f"{self.path} needs the input {name!r}, which the batch lacks")
                value = torch.zeros_like(ids)
            feed[name] = value.detach().cpu().numpy().astype(self._dtypes[name], copy=False)
        try:
            out = self.session.run(["logits"], feed)[0]
        except Exception as e:  # e.g. ids beyond the graph's vocabulary, a sequence longer than its positions
            raise OnnxModelError(
                f"onnxruntime could not run {self.path} on a batch of shape {tuple(ids.shape)} "
                f"(tokenizer of another model?): {_first_line(e)}"
            ) from None
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def check_labels(self, num_labels: int) -> None:
        """Refuse a task with another number of outputs than the graph's (when the graph fixes it)."""
        if self.num_labels is not None and self.num_labels != num_labels:
            raise OnnxModelError(f"{self.path} has {self.num_labels} output(s) but the task needs {num_labels}")

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, inputs={self.input_names}, num_labels={self.num_labels})"


__all__ = ["OnnxClassifier", "OnnxModelError"]
