"""`cahp compare --objective embedding` (issue 22, item 6): layer drop, the paired Spearman bootstrap, the pipeline."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cahp.pipelines.compare import CompareConfig, run_compare
from cahp.pipelines.compare_embedding import (
    EMBEDDING_METHODS,
    run_compare_embedding,
    versus_cahp,
)
from cahp.pipelines.embedding import SALIENCE_TARGET_NOISE, prepare_embedding
from cahp.pipelines.stages import PruneConfig
from cahp.selectors.base import HeadStats, check_mask
from cahp.selectors.label_free import LabelFreeFisher
from cahp.selectors.layer_drop import LayerDropSelector
from cahp.selectors.registry import make_selector
from cahp.train.finetune import FinetuneConfig
from cahp.train.metrics import PairedSpearman, paired_bootstrap_metric
from cahp.train.objectives import EmbeddingLoss

from .test_embedding import lively_sentence_folder, task_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random BERT sentence-transformers folder whose heads move the embeddings (test_embedding's)."""
    return lively_sentence_folder(tmp_path_factory.mktemp("st") / "src")

METHODS = ["random", "fisher", "layer-drop"]  # with CAHP, always compared: two baselines and layer drop


def test_layer_drop_keeps_the_first_heads_in_layer_order():
    stats = HeadStats(head_ids=[(i, h) for i in range(3) for h in range(4)], shape=(3, 4))
    sel = make_selector("layer-drop")
    assert isinstance(sel, LayerDropSelector) and sel.settings() == {} and not sel.seeded
    mask = sel.select(6, stats)
    check_mask(mask, 6, stats)
    assert mask[0].all() and mask[1].tolist() == [True, True, False, False] and not mask[2].any()
    assert sel.select(4, stats)[0].all() and int(sel.select(4, stats).sum()) == 4  # exactly one whole layer
    assert sel.select(12, stats).all()
    # a pruned model lists the heads it still has, in any order: the first k of them by (layer, head)
    pruned = HeadStats(head_ids=[(2, 0), (1, 3), (0, 2), (1, 0), (2, 3)], shape=(3, 4))
    got = sel.select(3, pruned)
    assert got.nonzero().tolist() == [[0, 2], [1, 0], [1, 3]]
    for k in (0, 6):
        with pytest.raises(ValueError, match="cannot keep"):
            sel.select(k, pruned)


def test_paired_spearman_agrees_with_the_metrics_bootstrap():
    rng = np.random.default_rng(0)
    labels = np.round(rng.uniform(0, 5, 60), 1)  # rounded: ties on the label side
    a = labels + rng.normal(0, 1.0, 60)
    b = labels + rng.normal(0, 2.0, 60)
    boot = PairedSpearman(labels, n_bootstrap=500, seed=3)
    assert boot.observed(a) == pytest.approx(spearmanr(a, labels).statistic, abs=1e-12)
    assert boot.observed(np.ones(60)) == 0.0  # a constant prediction ranks nothing
    one = versus_cahp(boot, [a], [b])
    ref = paired_bootstrap_metric(a, b, labels, "spearman", num_labels=1, n_bootstrap=500, seed=3)
    assert one["pooled"]["diff"] == pytest.approx(ref["diff"], abs=1e-12)
    np.testing.assert_allclose(one["pooled"]["ci95"], ref["ci95"], atol=1e-12)
    assert one["pooled"]["p_value"] == pytest.approx(ref["p_value"])
    assert one["pooled"]["verdict"] == "loss" and one["per_seed_verdicts"] == {"win": 0, "tie": 0, "loss": 1}
    # pooled over seeds: the difference of the mean Spearmans; per seed: one comparison each
    c = labels + rng.normal(0, 3.0, 60)
    two = versus_cahp(boot, [a, c], [b], seeds=[0, 1])
    expect = (boot.observed(a) + boot.observed(c)) / 2 - boot.observed(b)
    assert two["pooled"]["diff"] == pytest.approx(expect, abs=1e-12)
    assert [r["seed"] for r in two["per_seed"]] == [0, 1]
    assert two["per_seed"][0]["diff"] == pytest.approx(one["pooled"]["diff"])
    same = versus_cahp(boot, [b], [b])["pooled"]
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["verdict"] == "tie"
    with pytest.raises(ValueError, match="predictions must be 60"):
        boot.resampled(a[:10])
    with pytest.raises(ValueError, match="at least 2"):
        PairedSpearman([1.0], 10, 0)


def _setup(tmp_path, folder, **ccfg):
    task = task_folder(tmp_path / "task")
    sim = task_folder(tmp_path / "sim", pairs=True, seed=1)
    cfg = PruneConfig(model=str(folder), task=str(task), objective="embedding", similarity_task=str(sim),
                      output_dir=str(tmp_path / "run"), curve_examples=24, calibration_examples=32,
                      stats_batch_size=16, seed=0)
    ft = FinetuneConfig(epochs=1, lr=2e-3, batch_size=16, max_length=16, max_train_examples=40, seed=0)
    return cfg, ft, CompareConfig(**{"methods": METHODS, "budgets": [0.5], "seeds": 2, "n_bootstrap": 200, **ccfg})


def test_compare_embedding_end_to_end(tmp_path, folder):
    cfg, ft, ccfg = _setup(tmp_path, folder)
    report = run_compare_embedding(cfg, ft, ccfg, progress=False).report
    out = tmp_path / "run"
    for name in ("compare.json", "compare.md", "compare.png", "compare_layers.png", "report.json"):
        if name == "report.json":
            assert not (out / name).exists()  # a comparison is not a prune run: no model, no report
            continue
        assert (out / name).is_file(), name
    assert report["heads"] == 12 and report["partial"] is False and report["task"] == report["similarity_task"]
    assert [b["label"] for b in report["budgets"]] == ["k*", "50%"] and report["budgets"][1]["k"] == 6
    methods = ["cahp", *METHODS]
    for part in ("no_finetune", "finetuned"):
        for b in report["budgets"]:
            res = report[part]["results"][b["label"]]
            assert list(res) == methods
            assert all(res[m]["heads_kept"] == b["k"] for m in methods)
            assert "vs_cahp" not in res["cahp"]
            for m in METHODS:
                v = res[m]["vs_cahp"]
                assert v["pooled"]["verdict"] in ("win", "tie", "loss") and "CAHP" in v["pooled"]["text"]
                # per seed: the random selection of each seed, and every method distilled with each seed
                assert len(v["per_seed"]) == (2 if part == "finetuned" or m == "random" else 1), (part, m)
    pre, fine = report["no_finetune"]["results"]["50%"], report["finetuned"]["results"]["50%"]
    # layer drop keeps the first heads: all of layer 0, half of layer 1
    assert pre["layer-drop"]["heads_per_layer"] == [4, 2, 0] and pre["layer-drop"]["kept"]["1"] == [0, 1]
    assert pre["random"]["seeds"] == [0, 1] and pre["cahp"]["seeds"] == []
    assert set(pre["fisher"]["selection"]) >= {"objective", "objective_searched"}  # rearranged, label-free
    for m in methods:
        # the distillation starts from the pruned model and keeps its most faithful epoch (the start included)
        assert fine[m]["heldout_fidelity"] >= pre[m]["heldout_fidelity"] - 1e-4, m
        assert fine[m]["seeds"] == [0, 1] and all(e in (0, 1) for e in fine[m]["best_epochs"])
        assert -1 <= fine[m]["spearman"] <= 1 and fine[m]["parameters"] < report["dense"]["parameters"]
    dense = report["dense"]
    assert dense["heads_kept"] == 12 and dense["heldout_fidelity"] == 1.0 and set(dense["vs_cahp"]) == {"k*", "50%"}
    md = (out / "compare.md").read_text()
    assert "## 50%: 6 of 12 heads" in md and "| layer-drop | 6 |" in md and "| dense | 12 |" in md
    assert json.loads((out / "compare.json").read_text())["finetuned"]["results"]["50%"]["fisher"]["k"] == 6

    # again, through `run_compare`'s dispatch: every result from the cache, the same numbers
    again = run_compare(cfg, ft, ccfg, progress=False).report
    assert again["timings"]["results_computed"] == 0 and again["timings"]["results_cached"] > 0
    assert again["finetuned"] == report["finetuned"] and again["no_finetune"] == report["no_finetune"]
    assert again["dense"] == report["dense"]
    assert all(t["cached"] for t in again["timings"]["stages"].values())  # the prepared run's stages too


def test_cli_compare_objective_embedding(tmp_path, folder, capsys):
    from cahp.cli import main

    cfg, _, _ = _setup(tmp_path, folder)
    rc = main(["compare", "--objective", "embedding", "--model", cfg.model, "--task", cfg.task,
               "--similarity-task", cfg.similarity_task, "--curve-examples", "24", "--calibration-examples", "32",
               "--stats-batch-size", "16", "--no-knee", "--budgets", "0.25", "--seeds", "1", "--no-finetune",
               "--methods", "layer-drop", "--max-length", "16", "--n-bootstrap", "100",
               "--output-dir", cfg.output_dir])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "budgets 25%=3" in printed and "layer-drop, without fine-tuning, at 25% (3 heads)" in printed
    report = json.loads((tmp_path / "run" / "compare.json").read_text())
    assert report["finetuned"] is None and list(report["no_finetune"]["results"]["25%"]) == ["cahp", "layer-drop"]
    assert report["no_finetune"]["results"]["25%"]["layer-drop"]["heads_per_layer"] == [3, 0, 0]


def test_label_free_fisher_differentiates_the_embedding_loss(tmp_path, folder):
    cfg, ft, _ = _setup(tmp_path, folder)
    run = prepare_embedding(cfg, ft, tmp_path / "run", progress=False)
    loss = EmbeddingLoss(run.targets["calibration"], run.settings, run.distance, target_noise=SALIENCE_TARGET_NOISE,
                         seed=cfg.seed)
    sel = LabelFreeFisher(loss_fn=loss)
    assert sel.name == "fisher" and sel.settings() == make_selector("fisher").settings()
    grads = sel.batch_gradients(run.context())
    assert grads.shape == (len(run.calibration_batches), 3, 4) and bool((grads.abs() > 0).any())
    assert sel.batch_gradients(run.context()) is grads  # collected once for the model and batches
    # their mean squares are the salience pass's Fisher diagonal: the same loss on the same batches
    torch.testing.assert_close(grads.square().mean(0), run.stats.fisher.double(), rtol=1e-4, atol=1e-12)
    mask = sel.select(5, run.stats, run.context())
    check_mask(mask, 5, run.stats)
    assert set(sel.selection_info()) == {"objective", "objective_searched"}
    assert sel.selection_info()["objective"] >= sel.selection_info()["objective_searched"]
    with pytest.raises(ValueError, match="loss_fn"):
        LabelFreeFisher().batch_gradients(run.context())


def test_compare_embedding_refuses_bad_settings(tmp_path, folder):
    cfg, ft, ccfg = _setup(tmp_path, folder)
    with pytest.raises(ValueError, match="labelled loss"):
        run_compare_embedding(cfg, ft, CompareConfig(methods=["gradient-iterative"]))
    with pytest.raises(ValueError, match="unknown method"):
        run_compare_embedding(cfg, ft, CompareConfig(methods=["nope"]))
    with pytest.raises(ValueError, match="ffn"):
        run_compare_embedding(dataclasses.replace(cfg, ffn=True), ft, ccfg)
    cfg.similarity_task = "none"
    with pytest.raises(ValueError, match="similarity-task"):
        run_compare_embedding(cfg, ft, ccfg)
    assert not (tmp_path / "run").exists()  # refused before any work
    assert EMBEDDING_METHODS[0] == "cahp" and "layer-drop" in EMBEDDING_METHODS
