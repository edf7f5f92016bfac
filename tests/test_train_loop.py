"""cahp.train.loop.train_loop, the loop task fine-tuning and distillation share: best-state restore, early stopping,
the state before training as a candidate, the epochs' shuffle seeds, determinism and NaN scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cahp.data.batching import EncodedDataset, make_batches
from cahp.train.evaluate import labelled_loss
from cahp.train.finetune import FinetuneConfig
from cahp.train.loop import steps_per_epoch, train_loop

from .tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_data(n: int = 48, seed: int = 0) -> EncodedDataset:
    """Random token sequences of 3-10 tokens with labels 0/1 (label 1 when token 7 occurs)."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for _ in range(n):
        ids = [2, *rng.integers(5, 20, rng.integers(1, 8)).tolist(), 3]
        feats.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        labels.append(int(7 in ids))
    return EncodedDataset(features=feats, labels=labels)


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scripted(model, scores):
    """An evaluate callback returning ``scores`` in turn and recording the model's state at each call."""
    seen = []

    def evaluate():
        seen.append(state(model))
        score = scores[len(seen) - 1]
        return score, {"score_copy": score}

    return evaluate, seen


CFG = FinetuneConfig(epochs=5, lr=1e-2, batch_size=8, warmup_ratio=0.0, patience=2, seed=4)


def test_the_best_epoch_is_restored_and_training_stops_after_patience():
    model = tiny_model("bert", num_labels=2)
    evaluate, seen = scripted(model, [0.1, 0.5, 0.3, 0.2, 0.9])
    res = train_loop(model, toy_data(), labelled_loss, evaluate, CFG, 0, score_name="toy", progress=False)
    # epoch 2 is the best; epochs 3 and 4 are worse, so patience 2 stops before epoch 5
    assert res.best_epoch == 2 and res.best_score == 0.5 and res.best_fields == {"score_copy": 0.5}
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4] and len(seen) == 4
    assert list(res.history[0]) == ["epoch", "train_loss", "score_copy", "lr_end", "seconds", "train_seconds",
                                    "data_seconds"]
    assert same_state(state(model), seen[1]) and not same_state(state(model), seen[3])
    assert res.initial_score is None and not model.training


def test_the_state_before_training_is_a_candidate_with_evaluate_before():
    model = tiny_model("bert", num_labels=2)
    start = state(model)
    evaluate, seen = scripted(model, [0.8, 0.1, 0.2, 0.3])
    res = train_loop(model, toy_data(), labelled_loss, evaluate, CFG, 0, score_name="toy", evaluate_before=True,
                     progress=False)
    assert res.best_epoch == 0 and res.initial_score == 0.8 and res.best_fields == {"score_copy": 0.8}
    assert res.history[0] == {"epoch": 0, "score_copy": 0.8} and [r["epoch"] for r in res.history] == [0, 1, 2]
    assert same_state(seen[0], start) and same_state(state(model), start)  # the untrained weights came back


def test_a_tie_keeps_the_earlier_epoch_and_patience_zero_runs_every_epoch():
    model = tiny_model("bert", num_labels=2)
    cfg = FinetuneConfig(epochs=4, lr=1e-2, batch_size=8, patience=0, seed=0)
    evaluate, seen = scripted(model, [0.4, 0.4, 0.1, 0.0])
    res = train_loop(model, toy_data(), labelled_loss, evaluate, cfg, 0, score_name="toy", progress=False)
    assert res.best_epoch == 1 and len(res.history) == 4 and same_state(state(model), seen[0])


def test_epoch_seed_start_sets_each_epochs_batch_order():
    ds, cfg = toy_data(), FinetuneConfig(epochs=2, lr=1e-3, batch_size=8, patience=0, seed=3)
    for start in (0, 1):
        order = []

        def loss_fn(model, batch, device, order=order):
            order.append(batch["index"].tolist())
            return labelled_loss(model, batch, device)

        train_loop(tiny_model("bert", num_labels=2), ds, loss_fn, lambda: (0.0, {}), cfg, 0, score_name="toy",
                   epoch_seed_start=start, progress=False)
        # epoch e is shuffled with seed * 1000 + epoch_seed_start + e - 1
        expect = [b["index"].tolist() for e in (1, 2)
                  for b in make_batches(ds, 8, shuffle=True, seed=3 * 1000 + start + e - 1)]
        assert order == expect
    assert steps_per_epoch(len(ds), 8) == 6


def test_a_fixed_seed_gives_identical_weights_and_losses():
    runs = []
    for _ in range(2):
        model = tiny_model("bert", num_labels=2)
        res = train_loop(model, toy_data(), labelled_loss, lambda: (0.0, {}), CFG, 0, score_name="toy",
                         progress=False)
        runs.append((state(model), [r["train_loss"] for r in res.history]))
    assert same_state(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    other = tiny_model("bert", num_labels=2)
    cfg = FinetuneConfig(epochs=1, lr=1e-2, batch_size=8, seed=5)
    res = train_loop(other, toy_data(), labelled_loss, lambda: (0.0, {}), cfg, 0, score_name="toy", progress=False)
    assert res.history[0]["train_loss"] != runs[0][1][0]  # another seed, another batch order


def test_scores_that_are_all_nan_fail_with_a_clear_error():
    model = tiny_model("bert", num_labels=2)
    cfg = FinetuneConfig(epochs=1, lr=1e-3, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="no epoch gave a comparable toy score"):
        train_loop(model, toy_data(), labelled_loss, lambda: (float("nan"), {}), cfg, 0, score_name="toy score",
                   progress=False)


class Interrupted(Exception):
    pass


def _dropout_model():
    m = tiny_model("bert", num_labels=2)
    for mod in m.modules():  # the RNG state matters only if something draws from it
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.1
    return m


def test_an_interrupted_run_resumes_after_its_last_epoch_with_the_same_weights(tmp_path):
    """Epoch checkpoints: stopped in epoch 3, the run goes on from epoch 3 and ends as an uninterrupted one
    (same weights, same history, same best epoch, dropout included); the checkpoint is removed at the end,
    and one made under other settings is not taken up."""
    from dataclasses import replace

    from cahp.train.resume import EpochCheckpoint

    cfg = replace(CFG, patience=0, epochs=4)
    scores = [0.2, 0.6, 0.4, 0.5]
    data = toy_data()
    ref_model = _dropout_model()
    ref = train_loop(ref_model, data, labelled_loss, scripted(ref_model, scores)[0], cfg, 0, score_name="toy",
                     progress=False)
    ck = EpochCheckpoint(tmp_path / "ft.epoch.pt", {"stage": "toy"})
    calls = []

    def failing_loss(m, batch, device):
        calls.append(1)
        if len(calls) == 2 * steps_per_epoch(len(data), cfg.batch_size) + 2:  # inside epoch 3
            raise Interrupted
        return labelled_loss(m, batch, device)

    def interrupted_run():
        calls.clear()
        model = _dropout_model()
        with pytest.raises(Interrupted):
            train_loop(model, data, failing_loss, scripted(model, scores)[0], cfg, 0, score_name="toy",
                       checkpoint=ck, progress=False)
        saved = torch.load(ck.path, weights_only=True)
        assert saved["epoch"] == 2 and [r["epoch"] for r in saved["history"]] == [1, 2]

    interrupted_run()
    model = tiny_model("bert", num_labels=2)  # other weights: the checkpoint's state replaces them
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.1
    torch.manual_seed(123)
    evaluate, seen = scripted(model, scores[2:])
    res = train_loop(model, data, labelled_loss, evaluate, cfg, 0, score_name="toy", checkpoint=ck, progress=False)
    assert len(seen) == 2  # epochs 3 and 4 only
    assert same_state(state(model), state(ref_model))
    assert res.best_epoch == ref.best_epoch == 2 and res.best_score == ref.best_score
    assert [r["train_loss"] for r in res.history] == [r["train_loss"] for r in ref.history]
    assert not ck.path.exists()

    # a checkpoint made under other settings (here the caller's key) is not taken up: the run starts afresh
    interrupted_run()
    model = _dropout_model()
    evaluate, seen = scripted(model, scores)
    train_loop(model, data, labelled_loss, evaluate, cfg, 0, score_name="toy", progress=False,
               checkpoint=EpochCheckpoint(ck.path, {"stage": "another"}))
    assert len(seen) == 4 and same_state(state(model), state(ref_model)) and not ck.path.exists()
