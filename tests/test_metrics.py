"""Metrics and bootstrap intervals: agreement with sklearn / scipy, and the chunked bootstrap equal to the old one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from cahp.train import metrics
from cahp.train.metrics import (
    MetricError,
    metric_value,
    paired_bootstrap,
    paired_bootstrap_metric,
    resolve_metric,
    score,
)

# ----------------------------------------------------------------- the implementation before chunking


def _old_macro_f1_from_counts(tp, fp, fn):
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.mean(-1)


def old_score_ci(preds, labels, num_labels, n_bootstrap=1000, seed=0):
    """The accuracy / macro-F1 intervals as computed before (all resamples at once)."""
    correct = preds == labels
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(n_bootstrap, len(labels)))
    acc = correct[idx].mean(1)
    k = np.arange(num_labels)
    p = preds[idx][..., None] == k
    y = labels[idx][..., None] == k
    f1 = _old_macro_f1_from_counts((p & y).sum(1), (p & ~y).sum(1), (~p & y).sum(1))
    return [float(x) for x in np.percentile(acc, [2.5, 97.5])], [float(x) for x in np.percentile(f1, [2.5, 97.5])]


def old_paired_bootstrap(correct_a, correct_b, n_bootstrap=10000, seed=0):
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_bootstrap, len(d)))].mean(1)
    diff = float(d.mean())
    p = 2 * float((boots <= 0).mean()) if diff >= 0 else 2 * float((boots >= 0).mean())
    return {"diff": diff, "ci95": [float(x) for x in np.percentile(boots, [2.5, 97.5])], "p_value": min(1.0, p)}


def noisy_classes(n, k, seed, right=0.6):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return np.where(rng.random(n) < right, y, rng.integers(0, k, n)), y


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])  # one resample per chunk, uneven chunks, one chunk
@pytest.mark.parametrize("n", [1, 2, 333])
def test_chunked_score_equals_old(monkeypatch: pytest.MonkeyPatch, chunk: int, n: int) -> None:
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", chunk * n)
    p, y = noisy_classes(n, 4, seed=n)
    new = score(p, y, 4, n_bootstrap=301, seed=5)
    old_acc, old_f1 = old_score_ci(p, y, 4, n_bootstrap=301, seed=5)
    assert new["accuracy_ci95"] == old_acc and new["macro_f1_ci95"] == old_f1  # exactly


@pytest.mark.parametrize("chunk", [1, 3, 1 << 22])
def test_chunked_paired_bootstrap_equals_old(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random(501) < 0.6, rng.random(501) < 0.55
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", chunk * 501)
    assert paired_bootstrap(a, b, n_bootstrap=999, seed=4) == old_paired_bootstrap(a, b, n_bootstrap=999, seed=4)


def test_chunks_bound_the_index_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 1000)
    shapes = [idx.shape for idx in metrics.bootstrap_indices(300, 10, seed=0)]
    assert shapes == [(3, 300), (3, 300), (3, 300), (1, 300)]


# ------------------------------------------------------------------------------------------ classification


@pytest.mark.parametrize("k", [2, 3, 5])
def test_classification_metrics_match_sklearn(k: int) -> None:
    p, y = noisy_classes(700, k, seed=k)
    s = score(p, y, k, n_bootstrap=200)
    assert s["task_type"] == "classification"
    assert s["accuracy"] == pytest.approx((p == y).mean())
    assert s["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert s["matthews"] == pytest.approx(matthews_corrcoef(y, p))
    if k == 2:
        assert s["binary_f1"] == pytest.approx(f1_score(y, p))
    else:
        assert "binary_f1" not in s
    for m in ("accuracy", "macro_f1", "matthews") + (("binary_f1",) if k == 2 else ()):
        lo, hi = s[f"{m}_ci95"]
        assert lo < s[m] < hi, m
        assert metric_value(m, p, y, k) == pytest.approx(s[m])


def test_majority_baseline_on_imbalanced_data() -> None:
    y = np.array([1] * 69 + [0] * 31)
    p = np.ones(100, dtype=int)  # always the majority class
    s = score(p, y, 2, n_bootstrap=50)
    assert s["accuracy"] == pytest.approx(0.69) and s["matthews"] == 0.0
    assert s["baseline"] == {
        "kind": "majority_class", "prediction": 1, "accuracy": pytest.approx(0.69), "macro_f1": pytest.approx(
            f1_score(y, p, average="macro")), "binary_f1": pytest.approx(f1_score(y, p)), "matthews": 0.0,
    }
    assert s["majority_accuracy"] == pytest.approx(0.69)


def test_keys_of_classification_result_are_kept() -> None:
    p, y = noisy_classes(50, 3, seed=0)
    s = score(p, y, 3, n_bootstrap=10)
    assert {"n", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95"} <= set(s)
    assert set(score(p, y, 3, n_bootstrap=0)) == {"n", "task_type", "accuracy", "macro_f1", "matthews",
                                                   "baseline", "majority_accuracy"}


@pytest.mark.parametrize(
    "preds, labels, k, match",
    [
        ([0, 3], [0, 1], 3, "predictions must be class ids 0..2"),
        ([0, 1], [0, -1], 3, "labels must be class ids"),
        ([0.5, 1.0], [0, 1], 2, "class ids"),
        ([0, 1, 1], [0, 1], 2, "equal, non-empty"),
        ([], [], 2, "non-empty"),
    ],
)
def test_bad_classification_input(preds, labels, k, match) -> None:
    with pytest.raises(ValueError, match=match):
        score(preds, labels, k)


# ---------------------------------------------------------------------------------------------- regression


def test_regression_metrics_match_scipy() -> None:
    rng = np.random.default_rng(0)
    y = np.round(rng.uniform(0, 5, 400), 1)  # ties, as in STS-B
    p = y + rng.normal(0, 1.0, 400)
    s = score(p, y, 1, n_bootstrap=300, seed=1)
    assert s["task_type"] == "regression" and "accuracy" not in s
    assert s["pearson"] == pytest.approx(pearsonr(p, y)[0])
    assert s["spearman"] == pytest.approx(spearmanr(p, y)[0])
    assert s["mse"] == pytest.approx(((p - y) ** 2).mean())
    for m in ("pearson", "spearman", "mse"):
        assert s[f"{m}_ci95"][0] < s[m] < s[f"{m}_ci95"][1]
    assert s["baseline"]["kind"] == "mean_prediction"
    assert s["baseline"]["prediction"] == pytest.approx(y.mean())
    assert s["baseline"]["mse"] == pytest.approx(y.var())
    assert s["baseline"]["pearson"] == 0.0 and s["baseline"]["spearman"] == 0.0
    assert score(p, y, 1, n_bootstrap=300, seed=1) == s


def test_bootstrap_spearman_matches_scipy_per_resample(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 6, 60).astype(float)
    p = y + rng.normal(0, 2, 60)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 60 * 4)
    idx = np.concatenate(list(metrics.bootstrap_indices(60, 10, seed=0)))
    got = metrics._regression(p[idx], y[idx], ["spearman"])["spearman"]
    want = [spearmanr(p[i], y[i])[0] for i in idx]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_constant_predictions_correlate_zero() -> None:
    y = np.array([0.0, 1.0, 2.0, 3.0])
    s = score(np.full(4, 2.0), y, 1, n_bootstrap=20)
    assert s["pearson"] == 0.0 and s["spearman"] == 0.0 and not np.isnan(s["pearson_ci95"]).any()
    y = np.random.default_rng(0).uniform(0, 5, 100)  # a mean that rounds: x - x.mean() is not exactly 0
    assert score(y + 1.0, y, 1, n_bootstrap=0)["baseline"]["pearson"] == 0.0


def test_non_finite_regression_input() -> None:
    with pytest.raises(ValueError, match="finite"):
        score([0.1, float("nan")], [0.0, 1.0], 1)


# --------------------------------------------------------------------------------------- choosing metrics


def test_resolve_metric() -> None:
    assert resolve_metric(None, "classification", 3) == "accuracy"
    assert resolve_metric(None, "regression", 1) == "pearson"
    assert resolve_metric("accuracy", "regression", 1) == "pearson"  # every config's default
    assert resolve_metric("binary_f1", "classification", 2) == "binary_f1"
    with pytest.raises(MetricError, match="'binary_f1' does not apply to a classification task with 3 classes"):
        resolve_metric("binary_f1", "classification", 3)
    with pytest.raises(MetricError, match="'pearson' does not apply"):
        resolve_metric("pearson", "classification", 2)
    with pytest.raises(MetricError, match="'macro_f1' does not apply to a regression task"):
        resolve_metric("macro_f1", "regression", 1)
    with pytest.raises(MetricError, match="unknown metric 'auc'"):
        resolve_metric("auc", "classification", 2)


def test_paired_bootstrap_metric() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    a = np.where(rng.random(400) < 0.8, y, 1 - y)
    b = np.where(rng.random(400) < 0.6, y, 1 - y)
    acc = paired_bootstrap_metric(a, b, y, "accuracy", 2, n_bootstrap=500, seed=1)
    ref = paired_bootstrap(a == y, b == y, n_bootstrap=500, seed=1)
    assert acc["diff"] == pytest.approx(ref["diff"]) and acc["ci95"] == pytest.approx(ref["ci95"])
    mcc = paired_bootstrap_metric(a, b, y, "matthews", 2, n_bootstrap=500, seed=1)
    assert mcc["diff"] == pytest.approx(matthews_corrcoef(y, a) - matthews_corrcoef(y, b))
    assert mcc["ci95"][0] > 0 and mcc["p_value"] < 0.01
    same = paired_bootstrap_metric(a, a, y, "macro_f1", 2, n_bootstrap=100)
    assert same["diff"] == 0.0 and same["p_value"] == 1.0


def test_mean_loss_is_cross_entropy_or_squared_error():
    import torch

    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(9, 3)) * 30, rng.integers(0, 3, 9)  # large logits: the log-sum-exp must be stable
    want = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(y)).item()
    assert metrics.mean_loss(z, y) == pytest.approx(want, rel=1e-12)
    r, t = rng.normal(size=(6, 1)), rng.normal(size=6)
    assert metrics.mean_loss(r, t) == pytest.approx(float(np.mean((r[:, 0] - t) ** 2)))
    with pytest.raises(metrics.MetricError, match="logits"):
        metrics.mean_loss(z[:4], y)


def test_chance_loss_is_the_best_constant_predictors_mean_loss():
    """No constant output beats it: the frequencies' log (classes) or the mean (regression) is the best one."""
    rng = np.random.default_rng(1)
    y = rng.choice(4, size=200, p=[0.1, 0.2, 0.3, 0.4])
    best = metrics.chance_loss(y, 4)
    freq = np.bincount(y, minlength=4) / len(y)
    assert metrics.mean_loss(np.tile(np.log(freq), (len(y), 1)), y) == pytest.approx(best, rel=1e-12)
    for _ in range(20):  # any other constant logits do worse
        assert metrics.mean_loss(np.tile(rng.normal(size=4), (len(y), 1)), y) > best
    assert metrics.chance_loss(np.zeros(5, dtype=int), 3) == 0.0  # one class only: nothing to learn
    t = rng.normal(size=50)
    assert metrics.chance_loss(t, 1) == pytest.approx(metrics.mean_loss(np.full((50, 1), t.mean()), t))
    assert metrics.mean_loss(np.full((50, 1), t.mean() + 0.1), t) > metrics.chance_loss(t, 1)
    with pytest.raises(metrics.MetricError, match="label"):
        metrics.chance_loss([], 3)
