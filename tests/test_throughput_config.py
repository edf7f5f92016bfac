"""The encoding throughput's settings as an explicit ThroughputConfig: today's defaults and cache keys, checks,
the measurement it drives, its place in the embedding pipeline's cache key and report; cahp.core.threads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cahp.bench import timing
from cahp.core.threads import num_threads
from cahp.pipelines.cache import fingerprint
from cahp.pipelines.embedding_eval import (
    THROUGHPUT,
    ThroughputConfig,
    default_throughput,
    encoding_throughput,
    throughput_config,
)

from .test_embedding import WORDS, sentences, task_folder
from .test_embedding_eval import tokenizer  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("one_thread")

#: The module global the throughput settings were before they were a dataclass (its literal value).
OLD_THROUGHPUT = {"threads": (1, 2), "batch_sizes": (32, 1), "budget_s": 10.0, "sentences": {32: 512, 1: 64},
                  "n_bootstrap": 2000}


def test_the_defaults_and_their_cache_key_are_todays():
    cfg = ThroughputConfig()
    assert cfg.key() == OLD_THROUGHPUT and fingerprint(cfg.key()) == fingerprint(OLD_THROUGHPUT)
    # the embedding pipeline's throughput key holds the settings under "settings": stored results stay valid
    assert fingerprint({"stage": "throughput", "settings": cfg.key()}) == fingerprint(
        {"stage": "throughput", "settings": OLD_THROUGHPUT})
    # the bench's key held {**THROUGHPUT, **options} with the options' threads as a list: the same fingerprint
    bench_old = {**OLD_THROUGHPUT, "threads": [1], "budget_s": 2.0}
    assert fingerprint(dataclasses.replace(cfg, threads=(1,), budget_s=2.0).key()) == fingerprint(bench_old)


def test_equal_settings_give_equal_keys_and_every_field_is_in_the_key():
    written_loosely = ThroughputConfig(threads=[1, 2], batch_sizes=[32, 1], budget_s=10, sentences={32: 512, 1: 64})
    assert written_loosely == ThroughputConfig() and fingerprint(written_loosely.key()) == fingerprint(
        ThroughputConfig().key())
    base = fingerprint(ThroughputConfig().key())
    for change in ({"threads": (1,)}, {"batch_sizes": (32,)}, {"budget_s": 2.0}, {"sentences": {32: 100, 1: 64}},
                   {"n_bootstrap": 500}):
        assert fingerprint(dataclasses.replace(ThroughputConfig(), **change).key()) != base, change
    with pytest.raises(dataclasses.FrozenInstanceError):
        ThroughputConfig().budget_s = 1.0  # chosen once by the caller, passed down


@pytest.mark.parametrize("kw, match", [
    ({"threads": ()}, "threads must be one or more"),
    ({"threads": (0,)}, "threads must be one or more"),
    ({"batch_sizes": (8,)}, r"missing or < 1 for \[8\]"),
    ({"sentences": {32: 0, 1: 4}}, r"missing or < 1 for \[32\]"),
    ({"budget_s": -1.0}, "budget_s must be >= 0"),
    ({"n_bootstrap": 0}, "n_bootstrap >= 1"),
])
def test_bad_settings_fail_with_one_clear_line(kw, match):
    with pytest.raises(ValueError, match=match):
        ThroughputConfig(**kw)


def test_throughput_config_takes_none_a_config_or_a_dict_of_fields(monkeypatch):
    assert throughput_config(None) == default_throughput() == ThroughputConfig(**THROUGHPUT)
    mine = ThroughputConfig(threads=(2,), budget_s=1.0)
    assert throughput_config(mine) is mine
    assert throughput_config({"budget_s": 3.0}) == dataclasses.replace(default_throughput(), budget_s=3.0)
    monkeypatch.setitem(THROUGHPUT, "budget_s", 0.5)  # the process-wide defaults of a run that passes none
    assert throughput_config(None).budget_s == 0.5 and throughput_config(mine).budget_s == 1.0
    with pytest.raises(ValueError, match=r"unknown throughput settings \['seconds'\]"):
        throughput_config({"seconds": 1.0})
    with pytest.raises(TypeError, match="ThroughputConfig or a dict"):
        throughput_config([("budget_s", 1.0)])


def test_encoding_throughput_measures_exactly_what_the_config_says(monkeypatch, tokenizer):  # noqa: F811
    calls = []

    def fake(runners, budget_s, **kw):
        calls.append((torch.get_num_threads(), budget_s, list(runners)))
        return {name: [0.02, 0.021, 0.019] for name in runners}

    monkeypatch.setattr(timing, "time_round_robin", fake)
    texts = [" ".join(WORDS[i: i + 3]) for i in range(20)]
    cfg = ThroughputConfig(threads=(2, 1), batch_sizes=(4, 1), budget_s=0.25, sentences={4: 8, 1: 3}, n_bootstrap=50)
    before = torch.get_num_threads()
    out = encoding_throughput({"dense": None, "pruned": None}, tokenizer, texts, {}, max_length=8, config=cfg)
    assert list(out) == ["t2_b4", "t2_b1", "t1_b4", "t1_b1"]
    assert [c[:2] for c in calls] == [(2, 0.25), (2, 0.25), (1, 0.25), (1, 0.25)]  # threads set while timing
    assert out["t2_b4"]["sentences"] == 8 and out["t1_b1"]["sentences"] == 3
    assert torch.get_num_threads() == before  # and the caller's count restored


def _fake_run(tmp_path: Path, folder_texts):
    """The parts of an `EmbeddingRun` that `cahp.pipelines.embedding.throughput` reads."""
    from types import SimpleNamespace

    from cahp.pipelines.cache import StageCache
    from cahp.train.finetune import FinetuneConfig

    return SimpleNamespace(settings={}, ft_cfg=FinetuneConfig(max_length=16), identity={"model": "m"},
                           stages=StageCache(tmp_path / "stages"), model="dense-model", tokenizer=None,
                           curve_texts=folder_texts, cfg=SimpleNamespace(seed=0))


def test_a_cached_throughput_is_never_one_measured_with_other_settings(monkeypatch, tmp_path):
    from cahp.pipelines import embedding

    measured = []

    def fake(models, tok, texts, settings, max_len, seed, config):
        measured.append(config)
        return {"t1_b4": {"budget": config.budget_s}}

    monkeypatch.setattr(embedding, "encoding_throughput", fake)
    run = _fake_run(tmp_path, sentences(10))
    a = ThroughputConfig(threads=(1,), batch_sizes=(4,), budget_s=0.5, sentences={4: 8})
    first = embedding.throughput(run, "pruned", {"0": [1]}, a)
    again = embedding.throughput(run, "pruned", {"0": [1]}, dataclasses.replace(a))
    assert measured == [a] and again == first  # the same settings: read back
    for other in (dataclasses.replace(a, budget_s=1.0), dataclasses.replace(a, threads=(2,)),
                  dataclasses.replace(a, sentences={4: 9}), dataclasses.replace(a, n_bootstrap=10)):
        embedding.throughput(run, "pruned", {"0": [1]}, other)
        assert measured[-1] == other  # other settings: measured again
    assert len(measured) == 5


def test_the_embedding_pipeline_measures_and_reports_the_config_it_is_given(tmp_path):
    from cahp.pipelines.embedding import run_embedding
    from cahp.pipelines.stages import PruneConfig
    from cahp.train.finetune import FinetuneConfig

    from .test_embedding import lively_sentence_folder

    folder = lively_sentence_folder(tmp_path / "st")
    task = task_folder(tmp_path / "task")
    cfg = PruneConfig(model=str(folder), task=str(task), objective="embedding", similarity_task="none",
                      output_dir=str(tmp_path / "run"), curve_examples=20, calibration_examples=24,
                      stats_batch_size=12, keep=6, seed=0, skip_final_finetune=True)
    ft = FinetuneConfig(max_length=16)
    defaults = dict(THROUGHPUT)
    speed = ThroughputConfig(threads=(1,), batch_sizes=(4,), budget_s=0.01, sentences={4: 5}, n_bootstrap=50)
    report = run_embedding(cfg, ft, Path(cfg.output_dir), progress=False, throughput_cfg=speed).report
    assert list(report["throughput"]) == ["t1_b4"] and report["throughput"]["t1_b4"]["sentences"] == 5
    assert report["settings"]["throughput"] == speed.key() and defaults == THROUGHPUT  # passed, not set globally
    longer = dataclasses.replace(speed, budget_s=0.02)
    again = run_embedding(cfg, ft, Path(cfg.output_dir), progress=False, throughput_cfg=longer).report
    assert again["stage_seconds"]["throughput"]["cached"] is False
    assert again["settings"]["throughput"]["budget_s"] == 0.02
    assert all(t["cached"] for name, t in again["stage_seconds"].items() if name != "throughput")


def test_num_threads_sets_and_restores_the_count():
    before = torch.get_num_threads()
    with num_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), num_threads(2):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before  # restored on an error too
    with num_threads(None):
        assert torch.get_num_threads() == before
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive integer"), num_threads(bad):
            pass
