"""The label-free embedding objective (issue 22): loss, salience, distillation, STS scoring and the pipeline."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
import transformers
from scipy.stats import pearsonr, spearmanr

import cahp
from cahp.data.batching import make_batches
from cahp.data.tasks import Example, TaskError, get_task
from cahp.data.text import TextFileError, encode_texts, read_text_file, task_texts
from cahp.deploy.sentence import encode
from cahp.pipelines.embedding_eval import THROUGHPUT, SimilaritySet, SimilarityTaskError, load_similarity_task
from cahp.stats.salience import gate_gradients
from cahp.train.distill import distill
from cahp.train.finetune import FinetuneConfig
from cahp.train.objectives import (
    EmbeddingLoss,
    EmbeddingObjectiveError,
    embedding_distance,
    fidelity,
    sentence_settings,
    teacher_embeddings,
)

from .test_deploy import WORDS, tiny_sentence_folder

REMOVED = {0: [1, 2], 1: [0, 1, 2, 3], 2: [3]}  # uneven; layer 1 left with no head


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def quick_throughput(monkeypatch):
    """Throughput measured for a moment only: the tests check its bookkeeping, not the speed."""
    monkeypatch.setitem(THROUGHPUT, "threads", (1,))
    monkeypatch.setitem(THROUGHPUT, "budget_s", 0.01)
    monkeypatch.setitem(THROUGHPUT, "sentences", {32: 40, 1: 4})


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10))) for _ in range(n)]


def lively_sentence_folder(path):
    """`tiny_sentence_folder` with attention weights scaled up: at the default init (std 0.02) the heads barely
    move the residual stream, and removing them would hardly change an embedding."""
    folder = tiny_sentence_folder(path)
    model = transformers.AutoModel.from_pretrained(folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attention." in name and name.endswith("weight") and p.ndim == 2:
                p.mul_(8.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = lively_sentence_folder(tmp_path_factory.mktemp("st") / "src")
    model, tok = cahp.load_model(str(folder), kind="encoder")
    return folder, model, tok


def data(tok, texts, model, batch_size=8):
    ds = encode_texts(tok, texts, 16)
    batches = make_batches(ds, batch_size, shuffle=False, pad_token_id=tok.pad_token_id)
    return ds, batches, teacher_embeddings(model, batches, len(ds))


def test_batches_of_text_carry_no_labels(encoder):
    _, model, tok = encoder
    ds, batches, targets = data(tok, sentences(20), model)
    assert ds.labels == [] and all("labels" not in b for b in batches)
    assert targets.shape == (20, 32)
    # the targets are the embeddings sentence-transformers' pooling gives (deploy.sentence.encode)
    torch.testing.assert_close(targets, encode(model, tok, sentences(20)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_embedding_loss_is_zero_for_the_dense_model(encoder, distance):
    _, model, tok = encoder
    _, batches, targets = data(tok, sentences(24), model)
    loss = EmbeddingLoss(targets, sentence_settings(model), distance)
    with torch.no_grad():
        assert all(float(loss(model, b)) < 1e-6 for b in batches)
    assert fidelity(model, batches, targets, sentence_settings(model)) == pytest.approx(1.0, abs=1e-6)
    # a pruned copy is measurably away from the dense embeddings
    pruned = copy.deepcopy(model)
    cahp.remove_heads(pruned, REMOVED)
    with torch.no_grad():
        assert sum(float(loss(pruned, b)) for b in batches) > 1e-3
    assert fidelity(pruned, batches, targets, sentence_settings(model)) < 0.999


def test_gradients_reach_the_gates_without_labels(encoder):
    _, model, tok = encoder
    _, batches, targets = data(tok, sentences(32), model)
    settings = sentence_settings(model)
    # At the dense model the loss sits at its minimum: its gate gradient is 0, which is why salience needs noise.
    flat = gate_gradients(model, batches, progress=False, loss_fn=EmbeddingLoss(targets, settings))
    assert float(flat["salience"].max()) < 1e-5
    noisy = EmbeddingLoss(targets, settings, target_noise=0.1, seed=0)
    sal = gate_gradients(model, batches, progress=False, loss_fn=noisy)
    assert sal["salience"].shape == (3, 4) and bool((sal["salience"] > 1e-6).all())
    assert torch.isfinite(sal["fisher"]).all() and bool((sal["fisher"] > 0).all())
    again = gate_gradients(model, batches, progress=False, loss_fn=EmbeddingLoss(targets, settings, target_noise=0.1))
    torch.testing.assert_close(again["salience"], sal["salience"])  # seeded
    # the noise moves each target by about target_noise of its norm
    shift = (noisy.targets - targets).norm(dim=1) / targets.norm(dim=1)
    assert 0.05 < float(shift.mean()) < 0.15


def test_objective_errors(encoder):
    _, model, _ = encoder
    with pytest.raises(EmbeddingObjectiveError, match="unknown embedding distance"):
        embedding_distance(torch.zeros(2, 3), torch.zeros(2, 3), "l1")
    with pytest.raises(EmbeddingObjectiveError, match="target_noise"):
        EmbeddingLoss(torch.zeros(2, 3), {}, target_noise=-1)
    bare = copy.deepcopy(model)
    del bare.config.cahp_sentence_transformers
    with pytest.raises(EmbeddingObjectiveError, match="sentence-transformers"):
        sentence_settings(bare)


def test_distillation_reduces_the_embedding_distance(encoder):
    _, model, tok = encoder
    settings = sentence_settings(model)
    train_ds, train_batches, train_t = data(tok, sentences(96, seed=1), model)
    _, held_batches, held_t = data(tok, sentences(32, seed=2), model)
    student = copy.deepcopy(model)
    cahp.remove_heads(student, REMOVED)
    loss = EmbeddingLoss(train_t, settings)

    def train_distance():
        with torch.no_grad():
            return float(np.mean([float(loss(student, b)) for b in train_batches]))

    before = train_distance()
    cfg = FinetuneConfig(epochs=4, lr=3e-3, batch_size=16, warmup_ratio=0.0, patience=0, seed=0)
    result = distill(student, train_ds, train_t, held_batches, held_t, loss, cfg, tok.pad_token_id, progress=False)
    assert train_distance() < 0.7 * before
    assert result.best_epoch >= 1 and result.best_fidelity > result.initial_fidelity
    assert fidelity(student, held_batches, held_t, settings) == pytest.approx(result.best_fidelity, abs=1e-6)
    assert cahp.kept_heads(student)[1] == []  # still pruned
    with pytest.raises(EmbeddingObjectiveError, match="target embeddings"):
        distill(student, train_ds, train_t[:5], held_batches, held_t, loss, cfg, progress=False)


def test_similarity_spearman_of_cosines_on_a_toy_set(encoder):
    _, model, tok = encoder
    settings = sentence_settings(model)
    left, right = sentences(12, seed=3), sentences(12, seed=4)
    right[5] = left[5]  # one identical pair: cosine 1
    labels = [float(i % 6) for i in range(12)]
    pairs = [Example(a, b, y) for a, b, y in zip(left, right, labels)]
    sims = SimilaritySet(pairs, tok, max_length=12, batch_size=4, pad_token_id=tok.pad_token_id)
    preds = sims.predict(model, settings)
    emb_l, emb_r = encode(model, tok, left), encode(model, tok, right)
    expected = torch.nn.functional.cosine_similarity(emb_l, emb_r).double().numpy()
    np.testing.assert_allclose(preds, expected, atol=1e-5)
    assert preds[5] == pytest.approx(1.0, abs=1e-6)
    result = sims.evaluate(model, settings, n_bootstrap=200)
    # (the tiny model's cosines lie close together: rank against its own predictions, not the 1e-5 twins)
    assert result["spearman"] == pytest.approx(spearmanr(preds, labels).statistic, abs=1e-9)
    assert result["pearson"] == pytest.approx(pearsonr(preds, labels).statistic, abs=1e-9)
    lo, hi = result["spearman_ci95"]
    assert lo <= result["spearman"] <= hi
    assert sims.spearman(model, settings) == pytest.approx(result["spearman"])
    # scores that follow the cosines exactly rank perfectly
    ranked = [Example(a, b, float(p)) for a, b, p in zip(left, right, preds)]
    exact = SimilaritySet(ranked, tok, max_length=12, batch_size=4, pad_token_id=tok.pad_token_id)
    assert exact.spearman(model, settings) == pytest.approx(1.0)
    with pytest.raises(SimilarityTaskError, match="pairs"):
        SimilaritySet([Example("w1", None, 1.0)], tok, 12, 4, 0)


def test_text_sources(tmp_path):
    plain = tmp_path / "s.txt"
    plain.write_text("w1 w2\n\n  w3  \nw1 w2\n")
    assert read_text_file(plain) == ["w1 w2", "w3"]
    jl = tmp_path / "s.jsonl"
    jl.write_text('{"text": "w1"}\n"w2"\n{"sentence": "w3", "id": 4}\n\n')
    assert read_text_file(jl) == ["w1", "w2", "w3"]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(TextFileError, match="line 1"):
        read_text_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(TextFileError, match="no text"):
        read_text_file(tmp_path / "empty.txt")
    with pytest.raises(TextFileError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
    task = task_folder(tmp_path / "task", pairs=True)
    texts = task_texts(get_task(str(task), text_pair_column="text_pair"))
    assert len(texts) == len(set(texts)) and "w1 w2 w3" in texts  # both sides, each once


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def task_folder(folder, pairs=False, n=120, seed=0):
    """A tiny labelled task: train/dev/test .jsonl (classification, or float scores of pairs)."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for split, count in (("train", n), ("dev", 30), ("test", 40)):
        rows = []
        for i, t in enumerate(sentences(count, seed=seed * 10 + len(split))):
            if pairs:
                other = "w1 w2 w3" if i == 0 else " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
                rows.append({"text": t, "text_pair": other, "label": round(rng.uniform(0, 5), 2) + 0.01})
            else:
                rows.append({"text": t, "label": i % 3})
        _jsonl(folder / f"{split}.jsonl", rows)
    return folder


def test_pipeline_end_to_end(tmp_path, encoder):
    from sentence_transformers import SentenceTransformer

    from cahp.pipelines.prune import PruneConfig, run_prune

    folder, _, _ = encoder
    task = task_folder(tmp_path / "task")
    sim = task_folder(tmp_path / "sim", pairs=True, seed=1)
    assert load_similarity_task(str(sim)).is_regression
    with pytest.raises(TaskError, match="text_pair"):  # a folder of single texts: no pairs to compare
        load_similarity_task(str(task))
    out = tmp_path / "run"
    cfg = PruneConfig(model=str(folder), task=str(task), objective="embedding", similarity_task=str(sim),
                      output_dir=str(out), curve_examples=24, calibration_examples=32, stats_batch_size=16,
                      keep=6, seed=0)
    ft = FinetuneConfig(epochs=2, lr=2e-3, batch_size=16, max_length=16, seed=0)
    report = run_prune(cfg, ft, progress=False).report
    assert report["objective"] == "embedding" and report["embedding_distance"] == "cosine"
    assert report["heads_kept"] == 6 and report["knee_score"] == "similarity_dev_spearman"
    assert report["data"]["train_texts"] + report["data"]["curve_texts"] == 120
    assert report["curve"][0]["k"] == 12 and report["curve"][0]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    scores = report["scores"]
    assert scores["dense"]["heldout_fidelity"] == 1.0 and "spearman_ci95" in scores["dense"]["similarity_test"]
    assert scores["after_distillation"]["heldout_fidelity"] >= scores["after_pruning"]["heldout_fidelity"]
    assert "predictions" not in scores["after_pruning"]["similarity_test"]
    assert set(report["versus_dense"]["after_distillation"]) == {"spearman", "pearson"}
    speed = report["throughput"]
    assert set(speed) == {"t1_b32", "t1_b1"} and speed["t1_b32"]["sentences"] == 24  # all 24 held-out texts
    assert speed["t1_b1"]["sentences"] == 4 and speed["t1_b1"]["reps"] >= 3
    assert all(speed[c][m]["sentences_per_s"] > 0 for c in speed for m in ("dense", "pruned"))
    for name in ("report.json", "curve.png", "heads.png", "distances.png", "model/modules.json"):
        assert (out / name).is_file(), name
    # the pruned folder is a sentence-transformers model: same embeddings without cahp's pooling code
    texts = sentences(6, seed=9)
    pruned, tok = cahp.load_model(str(out / "model"), kind="encoder")
    assert sum(len(h) for h in cahp.kept_heads(pruned).values()) == 6
    st = SentenceTransformer(str(out / "model"), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True), encode(pruned, tok, texts), atol=1e-5,
                               rtol=0)
    # a second run reads every stage from the cache and reports the same
    again = run_prune(cfg, ft, progress=False).report
    assert all(t["cached"] for t in again["stage_seconds"].values())
    assert again["scores"] == report["scores"]


def test_pipeline_text_file_without_similarity_task(tmp_path, encoder):
    from cahp.pipelines.prune import PruneConfig, run_prune

    folder, _, _ = encoder
    task = task_folder(tmp_path / "task")
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(sentences(90, seed=5)) + "\n")
    cfg = PruneConfig(model=str(folder), task=str(task), objective="embedding-mse", text_file=str(text),
                      similarity_task="none", output_dir=str(tmp_path / "run"), curve_examples=20,
                      calibration_examples=24, stats_batch_size=12, seed=1, skip_final_finetune=True)
    report = run_prune(cfg, FinetuneConfig(max_length=16), progress=False).report
    assert report["embedding_distance"] == "mse" and report["knee_score"] == "fidelity"
    assert report["similarity_task"] is None and report["scores"]["after_distillation"] is None
    assert report["texts"].endswith("sentences.txt") and report["data"]["curve_texts"] == 20
    assert [p["score"] for p in report["curve"]] == [p["fidelity"] for p in report["curve"]]
    assert 1 <= report["heads_kept"] <= 12


def test_cli_prune_objective_embedding(tmp_path, encoder, capsys):
    from cahp.cli import main

    folder, _, _ = encoder
    task = task_folder(tmp_path / "task")
    out = tmp_path / "run"
    rc = main(["prune", "--objective", "embedding", "--model", str(folder), "--task", str(task),
               "--similarity-task", "none", "--curve-examples", "16", "--calibration-examples", "16",
               "--keep", "5", "--epochs", "1", "--max-length", "16", "--max-train-examples", "30",
               "--output-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kept 5 of 12 heads" in printed and "held-out fidelity" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["prune"]["objective"] == "embedding" and report["distillation"]["best_epoch"] in (0, 1)
    assert report["data"]["train_texts"] == 30 and report["data"]["curve_texts"] == 16  # only these got targets


def test_an_interrupted_distillation_resumes_with_the_same_weights(encoder, tmp_path, monkeypatch):
    """distill keeps an epoch checkpoint: interrupted in epoch 3, the resumed run ends as an uninterrupted one."""
    from cahp.train import loop
    from cahp.train.resume import EpochCheckpoint

    _, model, tok = encoder
    settings = sentence_settings(model)
    train_ds, _, train_t = data(tok, sentences(48, seed=1), model)
    _, held_batches, held_t = data(tok, sentences(16, seed=2), model)
    loss = EmbeddingLoss(train_t, settings)
    cfg = FinetuneConfig(epochs=3, lr=3e-3, batch_size=16, warmup_ratio=0.0, patience=0, seed=0)

    def student():
        s = copy.deepcopy(model)
        cahp.remove_heads(s, REMOVED)
        return s

    ref = student()
    ref_res = distill(ref, train_ds, train_t, held_batches, held_t, loss, cfg, tok.pad_token_id, progress=False)
    ck = EpochCheckpoint(tmp_path / "d.epoch.pt", {"what": "toy"})
    real, calls = loop.make_batches, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "make_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(student(), train_ds, train_t, held_batches, held_t, loss, cfg, tok.pad_token_id, progress=False,
                checkpoint=ck)
    assert torch.load(ck.path, weights_only=True)["epoch"] == 2
    monkeypatch.setattr(loop, "make_batches", real)
    again = student()
    res = distill(again, train_ds, train_t, held_batches, held_t, loss, cfg, tok.pad_token_id, progress=False,
                  checkpoint=ck)
    assert res.best_epoch == ref_res.best_epoch and res.best_fidelity == ref_res.best_fidelity
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ref.state_dict().values()))
    assert not ck.path.exists()
