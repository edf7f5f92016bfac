"""Evaluation: predictions, accuracy, macro-F1, bootstrap confidence intervals.

`predict` runs a model (dense, pruned or gated by the caller) over batches and
returns predictions in dataset order; `score` turns predictions into metrics
with percentile-bootstrap 95% intervals; `paired_bootstrap` compares two
systems on the same examples. All resampling is seeded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.core import distributed
from cahp.data.batching import MODEL_INPUTS, EncodedDataset, encode, iter_batches
from cahp.data.tasks import Task

log = logging.getLogger(__name__)


def model_inputs(batch: dict, device: torch.device | str | None = None) -> dict:
    """The entries of a batch that the model takes, moved to ``device``."""
    return {k: (v.to(device) if device is not None else v) for k, v in batch.items() if k in MODEL_INPUTS}


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[dict], n: int, desc: str | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and argmax predictions, in dataset order.

    Under torchrun each rank predicts its share of the batches (`cahp.core.distributed.shard`)
    and the (index, logits) pairs are gathered, so every rank returns the full
    arrays; every rank must call it (use ``cahp.core.distributed.local()`` for one rank alone).

    Args:
        model: a sequence-classification model.
        batches: batches with an ``index`` entry (positions in the dataset).
        n: dataset size.

    Returns:
        ``(predictions (n,), logits (n, num_labels))`` as numpy arrays.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    index, values = [], []
    bar = tqdm(distributed.shard(batches), desc=desc or "predict", disable=not distributed.show_progress(progress),
               leave=False, mininterval=2)
    for batch in bar:
        values.append(model(**model_inputs(batch, device)).logits.float().cpu())
        index.append(batch["index"].cpu())
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
    if torch.isnan(logits).any():
        raise ValueError("some examples were never predicted: batches do not cover the dataset")
    return logits.argmax(-1).numpy(), logits.numpy()


def _macro_f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # (..., K) counts -> (...,) macro-F1; a class with no true and no predicted
    # example contributes F1 = 0 (sklearn's zero_division=0).
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.mean(-1)


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    k = np.arange(num_labels)
    p, y = preds[:, None] == k, labels[:, None] == k
    return float(_macro_f1_from_counts((p & y).sum(0), (p & ~y).sum(0), (~p & y).sum(0)))


def score(
    preds: Sequence[int],
    labels: Sequence[int],
    num_labels: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Accuracy and macro-F1 with percentile-bootstrap 95% confidence intervals.

    Returns:
        ``{"n", "accuracy", "accuracy_ci95": [lo, hi], "macro_f1", "macro_f1_ci95": [lo, hi]}``.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.ndim != 1 or len(preds) == 0:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} must be equal, non-empty 1-D")
    correct = preds == labels
    result = {
        "n": int(len(labels)),
        "accuracy": float(correct.mean()),
        "macro_f1": macro_f1(preds, labels, num_labels),
    }
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(labels), size=(n_bootstrap, len(labels)))
        acc = correct[idx].mean(1)
        k = np.arange(num_labels)
        p = preds[idx][..., None] == k  # (B, n, K)
        y = labels[idx][..., None] == k
        f1 = _macro_f1_from_counts((p & y).sum(1), (p & ~y).sum(1), (~p & y).sum(1))
        result["accuracy_ci95"] = [float(x) for x in np.percentile(acc, [2.5, 97.5])]
        result["macro_f1_ci95"] = [float(x) for x in np.percentile(f1, [2.5, 97.5])]
    return result


def paired_bootstrap(correct_a: Sequence[bool], correct_b: Sequence[bool], n_bootstrap: int = 10000, seed: int = 0):
    """Paired bootstrap of accuracy(a) - accuracy(b) on the same examples.

    Returns:
        ``{"diff", "ci95": [lo, hi], "p_value"}``; p is two-sided: twice the share of
        resamples on the other side of zero from the observed difference (capped at 1).
    """
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired bootstrap needs two equal-length, non-empty 1-D arrays")
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_bootstrap, len(d)))].mean(1)
    diff = float(d.mean())
    if diff >= 0:
        p = 2 * float((boots <= 0).mean())
    else:
        p = 2 * float((boots >= 0).mean())
    return {"diff": diff, "ci95": [float(x) for x in np.percentile(boots, [2.5, 97.5])], "p_value": min(1.0, p)}


def evaluate_examples(
    model: nn.Module,
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
    """Score ``model`` on a list of examples; adds ``predictions`` (dataset order)."""
    ds = encoded if encoded is not None else encode(tokenizer, examples, max_length)
    batches = iter_batches(ds, batch_size, shuffle=False, pad_token_id=tokenizer.pad_token_id or 0)
    preds, _ = predict(model, batches, len(ds), desc=desc, progress=progress)
    result = score(preds, np.asarray(ds.labels), num_labels, n_bootstrap=n_bootstrap, seed=seed)
    result["predictions"] = preds.tolist()
    return result


def evaluate_task(
    model: nn.Module,
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
        ``{split: {"n", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95"[, "predictions"]}}``.
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
        log.info(
            "%s/%s: accuracy %.4f [%.4f, %.4f], macro-F1 %.4f (n=%d)", task.name, split, res["accuracy"],
            *res.get("accuracy_ci95", [float("nan")] * 2), res["macro_f1"], res["n"],
        )
    return out
