"""Metrics with seeded percentile-bootstrap 95% intervals, computed in chunks of resamples.

Classification: accuracy, macro-F1, binary F1 (F1 of class id 1, two classes only), Matthews correlation
(multi-class by Gorodkin's R_K, as sklearn computes it). Regression: Pearson and Spearman correlation (and
MSE). Every score also carries its constant baseline: the majority class of the scored labels, or their
mean for regression. `PairedSpearman` scores many systems' Spearman on one fixed set of resamples.

Conventions: a class with no true and no predicted example has F1 0, a correlation with a constant
side is 0 (sklearn's choices for F1 and Matthews), so no metric is ever NaN.

Bootstrap resamples are drawn from one ``numpy.random.default_rng(seed)`` in chunks of
:data:`CHUNK_ELEMENTS` indices: the generator yields the same index stream however the draw is cut, so
the results equal a single ``(n_bootstrap, n)`` draw exactly, without its memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "CLASSIFICATION_METRICS",
    "METRICS",
    "REGRESSION_METRICS",
    "MetricError",
    "PairedSpearman",
    "bootstrap_indices",
    "chance_loss",
    "default_metric",
    "macro_f1",
    "mean_loss",
    "metric_value",
    "metrics_for",
    "paired_bootstrap",
    "paired_bootstrap_metric",
    "resolve_metric",
    "score",
]

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "binary_f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")
#: Every metric that can select epochs or drive a curve; all are "higher is better".
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
#: Bootstrap indices per chunk (resamples x examples): 2**22 int64 = 32 MiB, whatever the data size.
CHUNK_ELEMENTS = 1 << 22


class MetricError(ValueError):
    """A metric that does not exist or does not apply to the task (e.g. Pearson on class ids)."""


def task_type_of(num_labels: int) -> str:
    """``"regression"`` for a one-output model (``num_labels == 1``), else ``"classification"``."""
    return "regression" if num_labels == 1 else "classification"


def metrics_for(task_type: str, num_labels: int) -> tuple[str, ...]:
    """The metrics of :data:`METRICS` that apply: binary F1 needs exactly two classes."""
    if task_type == "regression":
        return REGRESSION_METRICS
    return tuple(m for m in CLASSIFICATION_METRICS if m != "binary_f1" or num_labels == 2)


def default_metric(task_type: str) -> str:
    """The metric a task of this type reports first: accuracy, or Pearson for regression."""
    return "pearson" if task_type == "regression" else "accuracy"


def resolve_metric(metric: str | None, task_type: str, num_labels: int) -> str:
    """Check ``metric`` against the task; ``None`` means the task's :func:`default_metric`.

    ``"accuracy"`` on a regression task also means the default (Pearson): it is the default of every
    config, so a regression task needs no extra option.

    Raises:
        MetricError: An unknown metric, or one that does not apply to the task.
    """
    if metric is None or (metric == "accuracy" and task_type == "regression"):
        return default_metric(task_type)
    if metric not in METRICS:
        raise MetricError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    allowed = metrics_for(task_type, num_labels)
    if metric not in allowed:
        kind = f"{task_type} task" + (f" with {num_labels} classes" if task_type == "classification" else "")
        raise MetricError(f"metric {metric!r} does not apply to a {kind}; use one of {', '.join(allowed)}")
    return metric


def bootstrap_indices(n: int, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Resample indices in chunks: ``(rows, n)`` int arrays, ``n_bootstrap`` rows in all, in draw order."""
    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_bootstrap, rows):
        yield rng.integers(0, n, size=(min(rows, n_bootstrap - start), n))


# ------------------------------------------------------------------------------------- classification


def _confusions(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """(..., n) labels and predictions -> (..., k, k) counts, rows true class, columns predicted."""
    lead = labels.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    codes = (labels.reshape(rows, -1) * k + preds.reshape(rows, -1)) + (np.arange(rows) * k * k)[:, None]
    counts = np.bincount(codes.ravel(), minlength=rows * k * k)
    return counts.reshape(*lead, k, k)


def _macro_f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # (..., K) counts -> (...,) macro-F1; a class with no true and no predicted
    # example contributes F1 = 0 (sklearn's zero_division=0).
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.mean(-1)


def _from_confusion(cm: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """(..., K, K) confusion counts -> {metric: (...,) values} for the classification ``names``."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    true, pred = cm.sum(-1), cm.sum(-2)  # (..., K) per class: true and predicted counts
    n = true.sum(-1)
    out = {}
    if "accuracy" in names:
        out["accuracy"] = tp.sum(-1) / n
    if "macro_f1" in names:
        out["macro_f1"] = _macro_f1_from_counts(tp, pred - tp, true - tp)
    if "binary_f1" in names:
        denom = 2 * tp[..., 1] + (pred - tp)[..., 1] + (true - tp)[..., 1]
        out["binary_f1"] = np.where(denom > 0, 2 * tp[..., 1] / np.maximum(denom, 1), 0.0)
    if "matthews" in names:
        # float: the products reach n**4, beyond int64 for large n
        c, s = tp.sum(-1).astype(float), n.astype(float)
        t, p = true.astype(float), pred.astype(float)
        cov_tp = c * s - (t * p).sum(-1)
        cov_pp = s * s - (p * p).sum(-1)
        cov_tt = s * s - (t * t).sum(-1)
        denom = np.sqrt(cov_tt * cov_pp)
        out["matthews"] = np.where(denom > 0, cov_tp / np.where(denom > 0, denom, 1.0), 0.0)
    return out


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """Macro-averaged F1 over ``num_labels`` classes (a class absent from both sides counts 0)."""
    k = np.arange(num_labels)
    p, y = np.asarray(preds)[:, None] == k, np.asarray(labels)[:, None] == k
    return float(_macro_f1_from_counts((p & y).sum(0), (p & ~y).sum(0), (~p & y).sum(0)))


# ----------------------------------------------------------------------------------------- regression


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; 0 where either side is constant."""
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    denom = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    # constant by its values, not by a rounded deviation: the mean of n copies of v need not be v exactly
    ok = (x.max(-1) > x.min(-1)) & (y.max(-1) > y.min(-1)) & (denom > 0)
    return np.where(ok, (xc * yc).sum(-1) / np.where(ok, denom, 1.0), 0.0)


def _regression(preds: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """(..., n) predictions and scores -> {metric: (...,) values}."""
    out = {}
    if "pearson" in names:
        out["pearson"] = _pearson(preds, labels)
    if "spearman" in names:  # Pearson of average ranks (ties share their mean rank), as scipy does
        out["spearman"] = _pearson(rankdata(preds, axis=-1), rankdata(labels, axis=-1))
    if "mse" in names:
        out["mse"] = ((preds - labels) ** 2).mean(-1)
    return out


# ---------------------------------------------------------------------------------------------- scores


def _check(preds: Sequence, labels: Sequence, num_labels: int, task_type: str) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must be equal, non-empty 1-D")
    if task_type == "regression":
        p, y = p.astype(float), y.astype(float)
        if not (np.isfinite(p).all() and np.isfinite(y).all()):
            raise ValueError("regression predictions and labels must be finite")
        return p, y
    if task_type != "classification":
        raise MetricError(f"unknown task type {task_type!r}")
    if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"classification predictions and labels must be class ids, got {p.dtype} and {y.dtype}")
    for what, v in (("predictions", p), ("labels", y)):
        if v.min() < 0 or v.max() >= num_labels:
            raise ValueError(f"{what} must be class ids 0..{num_labels - 1}, found {v.min()}..{v.max()}")
    return p.astype(np.int64), y.astype(np.int64)


def _values(p: np.ndarray, y: np.ndarray, num_labels: int, task_type: str, names: Sequence[str]) -> dict:
    """Metric values of (..., n) predictions against labels."""
    if task_type == "regression":
        return _regression(p, y, names)
    return _from_confusion(_confusions(y, p, num_labels), names)


def metric_value(name: str, preds: Sequence, labels: Sequence, num_labels: int) -> float:
    """One metric of predictions against labels (``num_labels == 1``: regression)."""
    task_type = task_type_of(num_labels)
    name = resolve_metric(name, task_type, num_labels)
    p, y = _check(preds, labels, num_labels, task_type)
    return float(_values(p, y, num_labels, task_type, [name])[name])


def mean_loss(logits: np.ndarray, labels: Sequence) -> float:
    """The mean training loss of ``(n, classes)`` logits: cross-entropy against class ids in nats, or for a
    one-output (regression) model the mean squared error against the float targets."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or len(z) != len(labels) or not len(z):
        raise MetricError(f"mean_loss needs (n, classes) logits for n labels, got {z.shape} for {len(labels)}")
    if z.shape[1] == 1:
        return float(np.mean((z[:, 0] - np.asarray(labels, dtype=np.float64)) ** 2))
    y = np.asarray(labels, dtype=np.int64)
    top = z.max(axis=1, keepdims=True)
    log_norm = (top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))  # log-sum-exp, stable
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


def chance_loss(labels: Sequence, num_outputs: int) -> float:
    """The `mean_loss` of the best constant predictor for ``labels``: the entropy of their class frequencies
    in nats (constant logits ``log p``), or for one output (regression) the variance of the targets (their
    mean predicted). A model whose mean loss is not below it tells the labels apart no better than their
    frequencies alone: its outputs carry no information about them."""
    y = np.asarray(labels)
    if not len(y):
        raise MetricError("chance_loss needs at least one label")
    if num_outputs == 1:
        t = y.astype(np.float64)
        return float(np.mean((t - t.mean()) ** 2))
    p = np.bincount(y.astype(np.int64), minlength=num_outputs) / len(y)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _baseline(y: np.ndarray, num_labels: int, task_type: str, names: Sequence[str]) -> dict:
    """The best constant predictor for these labels: their majority class (lowest id on ties), or mean."""
    if task_type == "regression":
        mean = float(y.mean())
        values = _values(np.full_like(y, mean), y, num_labels, task_type, names)
        return {"kind": "mean_prediction", "prediction": mean, **{k: float(v) for k, v in values.items()}}
    major = int(np.bincount(y, minlength=num_labels).argmax())
    values = _values(np.full_like(y, major), y, num_labels, task_type, names)
    return {"kind": "majority_class", "prediction": major, **{k: float(v) for k, v in values.items()}}


def score(
    preds: Sequence,
    labels: Sequence,
    num_labels: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
    task_type: str | None = None,
) -> dict:
    """Every metric of the task type, each with a percentile-bootstrap 95% interval.

    Args:
        preds: Predicted class ids, or predicted scores for regression.
        labels: True class ids, or true scores.
        num_labels: Number of classes (1: regression).
        n_bootstrap: Resamples of the examples (0: no intervals).
        seed: Seed of the resampling; all metrics share the same resamples.
        task_type: ``"classification"`` or ``"regression"``; ``None``: from ``num_labels``.

    Returns:
        Classification: ``{"n", "task_type", "accuracy", "accuracy_ci95": [lo, hi], "macro_f1",
        "macro_f1_ci95", "matthews", "matthews_ci95", ["binary_f1", "binary_f1_ci95" (two classes)],
        "baseline"}``; regression: ``{"n", "task_type", "pearson", "pearson_ci95", "spearman",
        "spearman_ci95", "mse", "mse_ci95", "baseline"}``. ``baseline`` holds the same metrics of the
        constant predictor (``kind``, ``prediction``); classification adds ``majority_accuracy``.
    """
    task_type = task_type or task_type_of(num_labels)
    p, y = _check(preds, labels, num_labels, task_type)
    names = list(metrics_for(task_type, num_labels)) + (["mse"] if task_type == "regression" else [])
    result: dict = {"n": int(len(y)), "task_type": task_type}
    result.update({k: float(v) for k, v in _values(p, y, num_labels, task_type, names).items()})
    if n_bootstrap > 0:
        boots: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for idx in bootstrap_indices(len(y), n_bootstrap, seed):
            for k, v in _values(p[idx], y[idx], num_labels, task_type, names).items():
                boots[k].append(v)
        for k, parts in boots.items():
            result[f"{k}_ci95"] = [float(x) for x in np.percentile(np.concatenate(parts), [2.5, 97.5])]
    result["baseline"] = _baseline(y, num_labels, task_type, names)
    if task_type == "classification":
        result["majority_accuracy"] = result["baseline"]["accuracy"]
    return result


def _paired_summary(d_obs: float, boots: np.ndarray) -> dict:
    # p is two-sided: twice the share of resamples on the other side of zero from the observed difference
    p = 2 * float((boots <= 0).mean()) if d_obs >= 0 else 2 * float((boots >= 0).mean())
    return {"diff": d_obs, "ci95": [float(x) for x in np.percentile(boots, [2.5, 97.5])], "p_value": min(1.0, p)}


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
    boots = np.concatenate([d[idx].mean(1) for idx in bootstrap_indices(len(d), n_bootstrap, seed)])
    return _paired_summary(float(d.mean()), boots)


def paired_bootstrap_metric(
    preds_a: Sequence,
    preds_b: Sequence,
    labels: Sequence,
    metric: str,
    num_labels: int,
    n_bootstrap: int = 10000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of metric(a) - metric(b): both systems scored on the same resamples.

    For ``metric="accuracy"`` it agrees with :func:`paired_bootstrap` of the two correctness vectors (same
    resamples; differences of means rather than means of differences, so equal up to rounding).

    Returns:
        ``{"diff", "ci95": [lo, hi], "p_value"}`` as :func:`paired_bootstrap`.
    """
    task_type = task_type_of(num_labels)
    metric = resolve_metric(metric, task_type, num_labels)
    pa, y = _check(preds_a, labels, num_labels, task_type)
    pb, _ = _check(preds_b, labels, num_labels, task_type)

    def value(p: np.ndarray, yy: np.ndarray) -> np.ndarray:
        return _values(p, yy, num_labels, task_type, [metric])[metric]

    boots = np.concatenate(
        [value(pa[idx], y[idx]) - value(pb[idx], y[idx]) for idx in bootstrap_indices(len(y), n_bootstrap, seed)]
    )
    return _paired_summary(float(value(pa, y) - value(pb, y)), boots)


# ------------------------------------------------------------------------------------ paired Spearman


def _standardised_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, n) values -> (centred average ranks scaled to unit norm per row, whether the row is not constant).

    Spearman is the Pearson correlation of average ranks (ties share their mean rank, as scipy ranks);
    a constant row correlates 0 with anything, as `_pearson` scores it.
    """
    r = rankdata(x, axis=-1)
    r = r - r.mean(-1, keepdims=True)
    norm = np.sqrt((r * r).sum(-1, keepdims=True))
    varies = (x.max(-1) > x.min(-1)) & (norm[:, 0] > 0)
    return r / np.where(norm > 0, norm, 1.0), varies


class PairedSpearman:
    """Spearman of any system's (pairs,) predictions on one fixed set of bootstrap resamples of the test pairs.

    Every system is scored on the same ``n_bootstrap`` resamples (`bootstrap_indices` with ``seed``, the
    stream `paired_bootstrap_metric` draws), so the difference of two systems' resampled values is a paired
    bootstrap; the label side of each resample is ranked once here.

    Args:
        labels: (pairs,) human similarity scores.
        n_bootstrap: resamples.
        seed: seed of the resamples.
    """

    def __init__(self, labels, n_bootstrap: int, seed: int):
        self.labels = np.asarray(labels, dtype=np.float64)
        if self.labels.ndim != 1 or len(self.labels) < 2:
            raise ValueError(f"a paired Spearman needs at least 2 scored pairs, got shape {self.labels.shape}")
        if n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
        self.chunks = list(bootstrap_indices(len(self.labels), n_bootstrap, seed))
        self.label_ranks = [_standardised_ranks(self.labels[idx]) for idx in self.chunks]
        self._memo: dict[bytes, np.ndarray] = {}  # CAHP's predictions meet every other method's

    def _check(self, preds) -> np.ndarray:
        p = np.asarray(preds, dtype=np.float64)
        if p.shape != self.labels.shape or not np.isfinite(p).all():
            raise ValueError(f"predictions must be {len(self.labels)} finite values, got shape {p.shape}")
        return p

    def observed(self, preds) -> float:
        """Spearman of (pairs,) predictions with the scores, on all pairs."""
        p = self._check(preds)
        (rp, ok_p), (ry, ok_y) = _standardised_ranks(p[None]), _standardised_ranks(self.labels[None])
        return float(np.where(ok_p & ok_y, (rp * ry).sum(-1), 0.0)[0])

    def resampled(self, preds) -> np.ndarray:
        """(n_bootstrap,) Spearman of (pairs,) predictions on each resample, in the fixed resample order."""
        p = self._check(preds)
        if p.tobytes() in self._memo:
            return self._memo[p.tobytes()]
        out = []
        for idx, (ry, ok_y) in zip(self.chunks, self.label_ranks):
            rp, ok_p = _standardised_ranks(p[idx])
            out.append(np.where(ok_p & ok_y, (rp * ry).sum(-1), 0.0))
        self._memo[p.tobytes()] = np.concatenate(out)
        return self._memo[p.tobytes()]
