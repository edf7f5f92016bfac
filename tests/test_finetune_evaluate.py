"""Fine-tuning and evaluation on tiny models and a tiny synthetic task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

import cahp
from cahp.data.tasks import get_task
from cahp.train.evaluate import evaluate_task, paired_bootstrap, score
from cahp.train.finetune import FinetuneConfig, finetune

from .tiny import tiny_model


class CharTokenizer:
    """A minimal tokenizer with the interface cahp uses (fast-tokenizer call, pad id, save)."""

    pad_token_id = 0

    def __call__(self, texts, text_pair=None, truncation=True, max_length=128, **kw):
        out = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        pairs = text_pair if text_pair is not None else [None] * len(texts)
        for a, b in zip(texts, pairs):
            ids = [2] + [5 + (ord(c) % 90) for c in a][: max_length - 2] + [3]
            tt = [0] * len(ids)
            if b is not None:
                extra = [5 + (ord(c) % 90) for c in b] + [3]
                ids, tt = ids + extra, tt + [1] * len(extra)
            ids, tt = ids[:max_length], tt[:max_length]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["token_type_ids"].append(tt)
        return out

    def save_pretrained(self, path):
        pass


@pytest.fixture
def toy_task(tmp_path):
    """Label = whether the text contains 'z': learnable by a tiny model in a few epochs."""
    rng = np.random.default_rng(0)

    def rows(n):
        out = []
        for _ in range(n):
            s = "".join(rng.choice(list("abcdefgh"), size=rng.integers(3, 12)))
            y = int(rng.random() < 0.5)
            if y:
                pos = rng.integers(0, len(s))
                s = s[:pos] + "z" + s[pos:]
            out.append({"text": s, "label": y})
        return out

    for split, n in (("train", 400), ("dev", 100), ("test", 100)):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows(n)) + "\n")
    return get_task(str(tmp_path))


def test_score_matches_sklearn_and_ci_contains_point():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 500)
    p = np.where(rng.random(500) < 0.6, y, rng.integers(0, 5, 500))
    s = score(p, y, 5, n_bootstrap=500)
    assert s["accuracy"] == pytest.approx((p == y).mean())
    assert s["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert s["accuracy_ci95"][0] < s["accuracy"] < s["accuracy_ci95"][1]
    assert s["macro_f1_ci95"][0] < s["macro_f1"] < s["macro_f1_ci95"][1]
    assert score(p, y, 5, seed=3) == score(p, y, 5, seed=3)


def test_paired_bootstrap_detects_difference():
    rng = np.random.default_rng(0)
    a = rng.random(2000) < 0.6
    b = a.copy()
    assert paired_bootstrap(a, b)["p_value"] == 1.0
    b[:200] = False  # b strictly worse on 200 examples a may have right
    r = paired_bootstrap(a, b)
    assert r["diff"] > 0 and r["p_value"] < 0.01 and r["ci95"][0] > 0


def test_finetune_learns_and_keeps_pruned_model_pruned(toy_task, tmp_path):
    model = tiny_model("bert", num_labels=2)
    cahp.remove_heads(model, {0: [0, 1], 1: [0, 1, 2, 3]})
    kept_before = cahp.kept_heads(model)
    cfg = FinetuneConfig(epochs=6, lr=3e-3, batch_size=16, patience=0, seed=0)
    res = finetune(model, CharTokenizer(), toy_task, cfg, output_dir=tmp_path / "out", progress=False)
    assert len(res.history) == 6
    assert res.best_dev["accuracy"] >= 0.8, res.history
    assert res.best_dev["accuracy"] == max(h["dev"]["accuracy"] for h in res.history)
    assert cahp.kept_heads(model) == kept_before
    loaded, _ = cahp.load_pruned(tmp_path / "out", with_tokenizer=False)
    assert cahp.kept_heads(loaded) == kept_before
    # the restored best weights are what was saved
    batch = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_finetune_deterministic(toy_task):
    cfg = FinetuneConfig(epochs=1, lr=1e-3, batch_size=16, seed=3)
    losses = []
    for _ in range(2):
        model = tiny_model("bert", num_labels=2)
        losses.append(finetune(model, CharTokenizer(), toy_task, cfg, progress=False).history[0]["train_loss"])
    assert losses[0] == losses[1]


def test_early_stopping(toy_task):
    model = tiny_model("bert", num_labels=2)
    cfg = FinetuneConfig(epochs=8, lr=1e-9, batch_size=64, patience=1, seed=0)  # lr ~0: dev never improves
    res = finetune(model, CharTokenizer(), toy_task, cfg, progress=False)
    assert len(res.history) == 2 and res.best_epoch == 1


@pytest.fixture
def toy_regression_task(tmp_path):
    """Score = 0.5 x the number of 'z' in the text (0..2.5), as float labels: a regression task by detection."""
    rng = np.random.default_rng(1)

    def rows(n):
        out = []
        for _ in range(n):
            s = list(rng.choice(list("abcdefgh"), size=rng.integers(4, 10)))
            zs = int(rng.integers(0, 6))
            for _ in range(zs):
                s.insert(int(rng.integers(0, len(s) + 1)), "z")
            out.append({"text": "".join(s), "label": 0.5 * zs + 0.25})  # .25: never integral, so regression
        return out

    folder = tmp_path / "reg"
    folder.mkdir()
    for split, n in (("train", 400), ("dev", 100), ("test", 100)):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows(n)) + "\n")
    return get_task(str(folder))


def test_finetune_and_evaluate_regression(toy_regression_task, tmp_path):
    task = toy_regression_task
    assert task.task_type == "regression" and task.num_labels == 1
    model = tiny_model("bert", num_labels=1)
    cfg = FinetuneConfig(epochs=6, lr=3e-3, batch_size=16, patience=0, seed=0)  # metric "accuracy" -> pearson
    res = finetune(model, CharTokenizer(), task, cfg, output_dir=tmp_path / "out", progress=False)
    assert res.metric == "pearson" and res.config["metric"] == "accuracy"
    assert res.best_dev["pearson"] == max(h["dev"]["pearson"] for h in res.history)
    assert res.best_dev["pearson"] > 0.8, res.history
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert model.config.problem_type == "regression"
    out = evaluate_task(model, CharTokenizer(), task, n_bootstrap=100)["test"]
    assert out["task_type"] == "regression" and "accuracy" not in out
    assert out["pearson_ci95"][0] < out["pearson"] < out["pearson_ci95"][1]
    assert out["mse"] < out["baseline"]["mse"]  # better than predicting the mean
    loaded, _ = cahp.load_pruned(tmp_path / "out", with_tokenizer=False)
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)  # the weights exactly
    again = evaluate_task(loaded, CharTokenizer(), task, n_bootstrap=100)["test"]
    # The tiny model in memory runs eager attention, the reloaded one transformers' default (sdpa): the same
    # weights, outputs equal up to float32 rounding (~1e-7), which moves Pearson by up to a few 1e-6.
    assert again["pearson"] == pytest.approx(out["pearson"], abs=1e-5)


def test_finetune_regression_deterministic(toy_regression_task):
    cfg = FinetuneConfig(epochs=1, lr=1e-3, batch_size=32, seed=2, metric="spearman")
    runs = []
    for _ in range(2):
        res = finetune(tiny_model("bert", num_labels=1), CharTokenizer(), toy_regression_task, cfg, progress=False)
        runs.append((res.history[0]["train_loss"], res.best_dev["spearman"]))
    assert runs[0] == runs[1] and res.metric == "spearman"


def test_finetune_refuses_mismatches(toy_task, toy_regression_task):
    with pytest.raises(ValueError, match="the model has 3 output.*needs 1"):
        finetune(tiny_model("bert", num_labels=3), CharTokenizer(), toy_regression_task, progress=False)
    with pytest.raises(ValueError, match="'pearson' does not apply to a classification task"):
        finetune(tiny_model("bert", num_labels=2), CharTokenizer(), toy_task, FinetuneConfig(metric="pearson"),
                 progress=False)
    with pytest.raises(ValueError, match="max_train_examples must be >= 0, got -5"):
        finetune(tiny_model("bert", num_labels=2), CharTokenizer(), toy_task,
                 FinetuneConfig(max_train_examples=-5), progress=False)


def test_classification_dev_metric_matthews(toy_task):
    cfg = FinetuneConfig(epochs=2, lr=3e-3, batch_size=16, patience=0, seed=0, metric="matthews")
    res = finetune(tiny_model("bert", num_labels=2), CharTokenizer(), toy_task, cfg, progress=False)
    assert res.metric == "matthews"
    assert res.best_dev["matthews"] == max(h["dev"]["matthews"] for h in res.history)
    assert "accuracy" in res.best_dev and "binary_f1" in res.best_dev
