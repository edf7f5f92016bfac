"""`cahp prune --objective embedding --ffn` (issue 22): heads and FFN neurons of an embedding model, no labels."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import cahp
from cahp.deploy.sentence import encode
from cahp.model.neurons import KEPT_NEURONS_KEY, kept_neurons
from cahp.pipelines import embedding as embedding_pipeline
from cahp.pipelines import joint as joint_pipeline
from cahp.pipelines.embedding import salience_loss
from cahp.pipelines.joint_config import JointConfig, JointSetupError
from cahp.pipelines.prune import PruneConfig, run_prune
from cahp.stats.neurons import collect_neuron_stats
from cahp.stats.salience import gate_gradients
from cahp.train.finetune import FinetuneConfig
from cahp.train.objectives import EmbeddingLoss, sentence_settings

from .test_embedding import data, encoder, quick_throughput, sentences, task_folder  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = JointConfig(cost_source="macs", cost_shapes="1x12,4x16", grid_points=6, min_share=0.3, speedup_budget=0.05)


def _cfgs(folder, root, **kw):
    task = task_folder(root / "task")
    kw.setdefault("similarity_task", str(task_folder(root / "sim", pairs=True, seed=1)))
    cfg = PruneConfig(model=str(folder), task=str(task), objective="embedding", ffn=True,
                      output_dir=str(root / "run"), curve_examples=24, calibration_examples=32, stats_batch_size=16,
                      seed=0, **kw)
    return cfg, FinetuneConfig(epochs=2, lr=2e-3, batch_size=16, max_length=16, seed=0)


def test_gradients_reach_head_and_neuron_gates_without_labels(encoder):  # noqa: F811
    _, model, tok = encoder
    _, batches, targets = data(tok, sentences(32), model)
    assert all("labels" not in b for b in batches)
    settings = sentence_settings(model)
    noisy = salience_loss(targets, settings, "cosine", seed=0)
    stats = collect_neuron_stats(model, batches, progress=False, loss_fn=noisy)
    assert stats.salience.shape == (3, 64) and stats.head_salience.shape == (3, 4)
    assert bool((stats.head_salience > 1e-6).all()) and float((stats.salience > 0).float().mean()) > 0.9
    assert torch.isfinite(stats.fisher).all() and stats.tokens > 0 and stats.correlation[0].shape == (64, 64)
    # the heads' part is the heads-only pipeline's salience: same loss, gates at 1
    heads_only = gate_gradients(model, batches, progress=False, loss_fn=noisy)
    torch.testing.assert_close(stats.head_salience, heads_only["salience"].to(stats.head_salience.dtype))
    # at the unperturbed targets the dense model sits at the loss's minimum: no gradient, hence the noise
    flat = collect_neuron_stats(model, batches, progress=False, signatures=False,
                                loss_fn=EmbeddingLoss(targets, settings))
    assert float(flat.salience.max()) < 1e-5 < float(stats.salience.max())


def test_prune_embedding_ffn_end_to_end(tmp_path, encoder, monkeypatch):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    folder, dense, _ = encoder
    cfg, ft = _cfgs(folder, tmp_path, target_speedup=2.0)
    report = run_prune(cfg, ft, progress=False, joint=FAST).report
    out = tmp_path / "run"
    # the joint part: heads and neurons chosen on the curve at the target speedup, estimated and measured
    assert report["ffn"] and report["objective"] == "embedding" and report["k_source"] == "--target-speedup"
    assert report["estimated_share"] <= 0.5 + 1e-9 and set(report["measured_speedup"]) == {"1x12", "4x16"}
    assert report["heads_kept"] < 12 and report["neurons_kept"] < 3 * 64
    assert report["settings"]["joint"]["cost_shapes"] == "1x12,4x16"
    curve = report["curve"]
    assert curve[0]["target_share"] == 1.0 and curve[0]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert report["knee_score"] == "similarity_dev_spearman"
    assert all(p["score"] == p["similarity_dev_spearman"] and "accuracy" not in p for p in curve)
    assert report["curve_score"]["selected"] <= 1.0
    # the embedding part: zero-shot similarity test scores, distillation with early stopping, throughput
    scores = report["scores"]
    assert "spearman_ci95" in scores["dense"]["similarity_test"]
    assert scores["after_distillation"]["heldout_fidelity"] >= scores["after_pruning"]["heldout_fidelity"]
    assert report["distillation"]["best_epoch"] in (0, 1, 2) and set(report["versus_dense"]["after_distillation"])
    assert report["throughput"]["t1_b32"]["pruned"]["sentences_per_s"] > 0
    for name in ("report.json", "curve.png", "heads.png", "structure.png", "distances.png", "model/modules.json"):
        assert (out / name).is_file(), name
    # physically smaller: fewer heads and a narrower intermediate layer in the saved folder
    pruned, tok = cahp.load_model(str(out / "model"), kind="encoder")
    assert cahp.num_kept(pruned) == report["heads_kept"]
    kept = kept_neurons(pruned.config)
    widths = [layer.intermediate.dense.out_features for layer in pruned.encoder.layer]
    assert widths == [len(kept[i]) for i in range(3)] == report["neurons_per_layer"] and sum(widths) < 3 * 64
    assert cahp.count_parameters(pruned) == report["parameters"]["after"] < cahp.count_parameters(dense)
    texts = sentences(5, seed=9)
    st = SentenceTransformer(str(out / "model"), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True), encode(pruned, tok, texts), atol=1e-5,
                               rtol=0)
    # a re-run computes nothing
    for target, name in ((joint_pipeline, "collect_neuron_stats"), (embedding_pipeline, "distill")):
        monkeypatch.setattr(target, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = run_prune(cfg, ft, progress=False, joint=FAST).report
    assert all(t["cached"] for t in again["stage_seconds"].values()), again["stage_seconds"]
    assert again["kept_neurons"] == report["kept_neurons"] and again["scores"] == report["scores"]


def test_ffn_settings_are_part_of_the_cache_identity(tmp_path, encoder, monkeypatch):  # noqa: F811
    from cahp.pipelines.embedding_joint import run_embedding_joint

    folder, _, _ = encoder
    cfg, ft = _cfgs(folder, tmp_path, similarity_task="none", target_speedup=1.6)
    out = tmp_path / "run"
    first = run_embedding_joint(cfg, ft, out, progress=False, joint=FAST).report
    assert first["knee_score"] == "fidelity" and all(p["score"] == p["fidelity"] for p in first["curve"])
    # another linkage: the statistics are reused, the curve is not
    other = run_embedding_joint(cfg, ft, out, progress=False, joint=dataclasses.replace(FAST, linkage="complete"))
    times = other.report["stage_seconds"]
    assert times["neuron_stats"]["cached"] and times["salience"]["cached"] and not times["curve"]["cached"]
    assert other.report["settings"]["joint"]["linkage"] == "complete"
    # other cost shapes: new cost tables, a new curve
    times = run_embedding_joint(cfg, ft, out, progress=False,
                                joint=dataclasses.replace(FAST, cost_shapes="1x8,2x16")).report["stage_seconds"]
    assert not times["cost_table"]["cached"] and not times["curve"]["cached"]
    # a heads-only run in the same folder replaces model/; the joint final stage must not take it for its own
    heads_only = dataclasses.replace(cfg, ffn=False, target_speedup=0.0, keep=6, overwrite=True)
    assert run_prune(heads_only, ft, progress=False).report["heads_kept"] == 6
    assert KEPT_NEURONS_KEY not in json.loads((out / "model" / "config.json").read_text())
    distilled = []
    real = embedding_pipeline.distill
    monkeypatch.setattr(embedding_pipeline, "distill", lambda *a, **k: distilled.append(1) or real(*a, **k))
    back = run_embedding_joint(dataclasses.replace(cfg, overwrite=True), ft, out, progress=False, joint=FAST).report
    assert distilled and not back["stage_seconds"]["surgery_and_distill"]["cached"]
    assert back["kept_neurons"] == first["kept_neurons"] and back["neurons_kept"] < 3 * 64


def test_bad_settings_fail_before_work(tmp_path, encoder):  # noqa: F811
    folder, _, _ = encoder
    for i, (kw, match) in enumerate((({"keep": 3}, "count heads only"), ({"target_speedup": 0.5}, "above 1"),
                                     ({}, "head weights must be positive"))):
        cfg, ft = _cfgs(folder, tmp_path / str(i), **kw)
        with pytest.raises(JointSetupError, match=match):
            run_prune(cfg, ft, progress=False, joint=dataclasses.replace(FAST, head_weights="1,-2") if not kw else FAST)
        assert not (tmp_path / str(i) / "run").exists()  # refused before the output folder was made
    with pytest.raises(ValueError, match="heads only"):
        embedding_pipeline.run_embedding(cfg, ft, tmp_path / "x", progress=False)


def test_cli_prune_objective_embedding_ffn(tmp_path, encoder, capsys):  # noqa: F811
    from cahp.cli import main

    folder, _, _ = encoder
    task = task_folder(tmp_path / "task")
    out = tmp_path / "run"
    rc = main(["prune", "--objective", "embedding", "--ffn", "--model", str(folder), "--task", str(task),
               "--similarity-task", "none", "--curve-examples", "16", "--calibration-examples", "16",
               "--target-speedup", "1.5", "--cost-source", "macs", "--cost-shapes", "1x12", "--grid-points", "4",
               "--speedup-budget", "0", "--skip-final-finetune", "--max-length", "16", "--output-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "FFN neurons" in printed and "held-out fidelity" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["ffn"] and report["settings"]["prune"]["ffn"] and report["settings"]["joint"]["grid_points"] == 4
    assert report["measured_speedup"] is None and report["scores"]["after_distillation"] is None
    assert report["estimated_speedup"]["1x12"] >= 1.5 - 1e-9
