"""Evaluation: predictions in dataset order, scored with bootstrap confidence intervals.

`predict` runs a model (dense, pruned or gated by the caller) over batches and
returns predictions in dataset order (class ids, or the single output of a
regression head); `score` (from `cahp.train.metrics`) turns them into every
metric of the task type with percentile-bootstrap 95% intervals;
`paired_bootstrap` compares two systems on the same examples. All resampling is
seeded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.arch import get_adapter
from cahp.core import distributed
from cahp.data.batching import MODEL_INPUTS, EncodedDataset, encode, iter_batches
from cahp.data.tasks import Task
from cahp.train.metrics import macro_f1, paired_bootstrap, paired_bootstrap_metric, score

__all__ = [
    "MODEL_INPUTS",
    "Predictor",
    "evaluate_examples",
    "evaluate_task",
    "hidden_fidelity",
    "macro_f1",
    "model_inputs",
    "paired_bootstrap",
    "paired_bootstrap_metric",
    "predict",
    "predict_hidden",
    "score",
]

log = logging.getLogger(__name__)


def model_inputs(batch: dict, device: torch.device | str | None = None) -> dict:
    """The entries of a batch that the model takes, moved to ``device``."""
    return {k: (v.to(device) if device is not None else v) for k, v in batch.items() if k in MODEL_INPUTS}


def labelled_loss(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """The model's own loss against the batch's ``labels``: what fine-tuning (classification) minimises and
    what the gate-gradient passes (head salience, neuron statistics) differentiate by default."""
    return model(**model_inputs(batch, device), labels=batch["labels"].to(device)).loss


class Predictor(Protocol):
    """What `predict` runs besides a torch module: ``logits(inputs) -> (batch, num_labels)`` tensor.

    ``inputs`` holds the batch's `MODEL_INPUTS` on the CPU; `cahp.deploy.runtime.OnnxClassifier` is one.
    """

    def logits(self, inputs: dict) -> torch.Tensor: ...


def _predictions(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(predictions, logits)`` of filled ``(n, num_labels)`` logits: the argmax class ids, or for a one-output
    (regression) head the output itself; a ValueError where an example was never predicted (NaN rows)."""
    if torch.isnan(logits).any():
        raise ValueError("some examples were never predicted: batches do not cover the dataset")
    preds = logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1)
    return preds.numpy(), logits.numpy()


@torch.no_grad()
def predict(
    model: nn.Module | Predictor, batches: Iterable[dict], n: int, desc: str | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and argmax predictions, in dataset order.

    Under torchrun each rank predicts its share of the batches (`cahp.core.distributed.shard`)
    and the (index, logits) pairs are gathered, so every rank returns the full
    arrays; every rank must call it (use ``cahp.core.distributed.local()`` for one rank alone).

    Args:
        model: a sequence-classification model, or a `Predictor` (an ONNX file: `cahp.deploy.runtime`).
        batches: batches with an ``index`` entry (positions in the dataset).
        n: dataset size.

    Returns:
        ``(predictions (n,), logits (n, num_labels))`` as numpy arrays; the predictions are the argmax
        class ids, or for a one-output (regression) head the output itself (floats).
    """
    torch_model = isinstance(model, nn.Module)
    if torch_model:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
    index, values = [], []
    bar = tqdm(distributed.shard(batches), desc=desc or "predict", disable=not distributed.show_progress(progress),
               leave=False, mininterval=2)
    for batch in bar:
        if torch_model:
            values.append(model(**model_inputs(batch, device)).logits.float().cpu())
        else:
            values.append(model.logits(model_inputs(batch)).float().cpu())
        index.append(batch["index"].cpu())
    if torch_model:
        model.train(was_training)
    local = (torch.cat(index), torch.cat(values)) if values else None
    logits = None
    for part in distributed.all_gather_object(local):
        if part is None:
            continue
        if logits is None:
            logits = torch.full((n, part[1].shape[-1]), float("nan"))
        logits[part[0]] = part[1]
    if logits is None:
        raise ValueError("no batches to predict")
    return _predictions(logits)


@torch.no_grad()
def predict_hidden(model: nn.Module, batches: Sequence[dict], n: int) -> tuple[np.ndarray, np.ndarray, list]:
    """`predict`'s predictions and logits, and per batch the last layer's hidden states ``(batch, seq, hidden)``
    (float32, CPU), in one pass. Every rank runs every batch (no sharding), so the states need no gathering.

    The states come from a hook on the last layer, removed on return: ``output_hidden_states=True`` would leave
    transformers' own recording hooks on the model, which the timing refuses."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = torch.full((n, model.config.num_labels), float("nan"))
    hidden = []

    def keep(module, args, out):
        hidden.append((out[0] if isinstance(out, tuple) else out).float().cpu())

    hook = get_adapter(model).layers(model)[-1].register_forward_hook(keep)
    try:
        for batch in batches:
            logits[batch["index"].cpu()] = model(**model_inputs(batch, device)).logits.float().cpu()
    finally:
        hook.remove()
        model.train(was_training)
    return (*_predictions(logits), hidden)


def hidden_fidelity(hidden: Sequence[torch.Tensor], reference: Sequence[torch.Tensor],
                    batches: Sequence[dict]) -> float:
    """Mean cosine of ``hidden`` with ``reference`` (per batch ``(batch, seq, hidden)``, `predict_hidden`) over
    the batches' real tokens (``attention_mask`` 1): padding positions carry no text, so they do not count."""
    if not (len(hidden) == len(reference) == len(batches)) or not batches:
        raise ValueError(f"hidden_fidelity needs one state per batch, got {len(hidden)}, {len(reference)} for "
                         f"{len(batches)} batches")
    total, count = 0.0, 0
    for h, r, batch in zip(hidden, reference, batches, strict=True):
        real = batch["attention_mask"].bool()  # (batch, seq)
        cos = torch.nn.functional.cosine_similarity(h[real].double(), r[real].double(), dim=-1)  # (real tokens,)
        total += float(cos.sum())
        count += int(real.sum())
    return total / count


def evaluate_examples(
    model: nn.Module | Predictor,
    tokenizer,
    examples,
    num_labels: int,
    *,
    max_length: int = 128,
    batch_size: int = 64,
    n_bootstrap: int = 1000,
    seed: int = 0,
    desc: str | None = None,
    encoded: EncodedDataset | None = None,
    progress: bool = True,
) -> dict:
    """Score ``model`` on a list of examples (see `score`); adds ``predictions`` (dataset order).

    ``num_labels`` is the task's (1: regression); the model must have as many outputs.
    """
    ds = encoded if encoded is not None else encode(tokenizer, examples, max_length)
    batches = iter_batches(ds, batch_size, shuffle=False, pad_token_id=tokenizer.pad_token_id or 0)
    preds, logits = predict(model, batches, len(ds), desc=desc, progress=progress)
    if logits.shape[-1] != num_labels:
        raise ValueError(f"the model has {logits.shape[-1]} output(s) but the task needs {num_labels}")
    result = score(preds, np.asarray(ds.labels), num_labels, n_bootstrap=n_bootstrap, seed=seed)
    result["predictions"] = preds.tolist()
    return result


def evaluate_task(
    model: nn.Module | Predictor,
    tokenizer,
    task: Task,
    splits: Sequence[str] | None = None,
    *,
    max_length: int = 128,
    batch_size: int = 64,
    n_bootstrap: int = 1000,
    seed: int = 0,
    keep_predictions: bool = False,
    progress: bool = True,
) -> dict:
    """Score ``model`` on task splits (default: the test split and any extra evaluation splits).

    Returns:
        ``{split: score}`` with the keys of `cahp.train.metrics.score` (classification: ``"n"``,
        ``"accuracy"``, ``"accuracy_ci95"``, ``"macro_f1"``, ``"macro_f1_ci95"``, ``"matthews"``, ...;
        regression: ``"pearson"``, ``"spearman"``, ...) and ``"predictions"`` if ``keep_predictions``.
        For MNLI the test split is matched and the extra split mismatched accuracy.
    """
    splits = list(splits) if splits else [task.test_split, *task.extra_eval_splits]
    out = {}
    for split in splits:
        examples = task.load(split)
        res = evaluate_examples(
            model, tokenizer, examples, task.num_labels, max_length=max_length, batch_size=batch_size,
            n_bootstrap=n_bootstrap, seed=seed, desc=f"evaluate {task.name}/{split}", progress=progress,
        )
        if not keep_predictions:
            res.pop("predictions")
        out[split] = res
        if task.is_regression:
            log.info(
                "%s/%s: Pearson %.4f [%.4f, %.4f], Spearman %.4f, MSE %.4f (mean prediction %.4f) (n=%d)",
                task.name, split, res["pearson"], *res.get("pearson_ci95", [float("nan")] * 2), res["spearman"],
                res["mse"], res["baseline"]["mse"], res["n"],
            )
        else:
            log.info(
                "%s/%s: accuracy %.4f [%.4f, %.4f], macro-F1 %.4f, Matthews %.4f, majority class %.4f (n=%d)",
                task.name, split, res["accuracy"], *res.get("accuracy_ci95", [float("nan")] * 2), res["macro_f1"],
                res["matthews"], res["majority_accuracy"], res["n"],
            )
    return out
