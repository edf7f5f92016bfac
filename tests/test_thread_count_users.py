"""Every timing that sets torch's thread count does it through `cahp.core.threads.num_threads`: the count asked
for while timing, the caller's count back afterwards, also when the timing fails."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from cahp.bench import decode
from cahp.bench.decode import DecodeTimingConfig, time_decode
from cahp.budget import cost_measure
from cahp.budget.cost import CostModelError
from cahp.core.threads import num_threads
from cahp.pipelines import joint, joint_report
from cahp.pipelines.joint_config import JointConfig

from .tiny import tiny_model

INNER = 2  # the count asked for; the caller runs with one thread (fixture one_thread)


class Boom(RuntimeError):
    pass


def _tiny_lm() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_num_threads_raises_the_error_class_it_is_given(one_thread):
    with pytest.raises(CostModelError, match="threads must be a positive integer, got 0"), \
            num_threads(0, error=CostModelError):
        pass
    with pytest.raises(ValueError, match="got True") as info, num_threads(True):
        pass
    assert type(info.value) is ValueError  # the default stays a plain ValueError
    assert torch.get_num_threads() == 1


def test_time_decode_times_at_its_thread_count_and_restores_the_callers(one_thread, monkeypatch):
    seen = []

    def fake(runners, **kw):
        seen.append(torch.get_num_threads())
        return {name: [0.01, 0.011, 0.009] for name in runners}

    monkeypatch.setattr(decode, "time_round_robin", fake)
    model = _tiny_lm()
    timing = DecodeTimingConfig(seconds=0.1, new_tokens=2, prompt_tokens=3, batch_sizes=[1, 2], prefill_tokens=8,
                                threads=INNER, n_bootstrap=20)
    out = time_decode(model, model, timing, pad_token_id=0)
    assert seen == [INNER] * 3  # two generation batch sizes and the prefill
    assert sorted(out["decode"]) == ["1", "2"] and out["settings"]["threads"] == INNER
    assert torch.get_num_threads() == 1

    def failing(runners, **kw):
        raise Boom("timing failed")

    monkeypatch.setattr(decode, "time_round_robin", failing)
    with pytest.raises(Boom):
        time_decode(model, model, timing, pad_token_id=0)
    assert torch.get_num_threads() == 1  # restored on an error too


def test_measure_speedup_times_at_its_thread_count_and_restores_the_callers(one_thread, monkeypatch):
    seen = []

    def kernel(models, kernel, inputs, sync, warmup, candidates, clock="wall"):
        seen.append(("kernel", torch.get_num_threads()))
        return "eager", None

    def times(runners, cfg, sync=None):
        seen.append(("time", torch.get_num_threads()))
        return {name: [0.02, 0.021, 0.019] for name in runners}

    monkeypatch.setattr(joint_report, "choose_kernel", kernel)
    monkeypatch.setattr(joint_report, "time_models", times)
    model = tiny_model("bert")
    out = joint_report.measure_speedup(model, model, "1x8,2x4", budget=0.1, threads=INNER)
    assert seen == [("kernel", INNER), ("time", INNER)] * 2
    assert sorted(out) == ["1x8", "2x4"] and out["1x8"]["threads"] == INNER
    assert torch.get_num_threads() == 1

    def failing(runners, cfg, sync=None):
        raise Boom("timing failed")

    monkeypatch.setattr(joint_report, "time_models", failing)
    with pytest.raises(Boom):
        joint_report.measure_speedup(model, model, "1x8", budget=0.1, threads=INNER)
    assert torch.get_num_threads() == 1


def test_measured_cost_tables_choose_the_kernel_at_the_cost_thread_count(one_thread, monkeypatch):
    seen = []

    def kernel(models, kernel, inputs, sync, warmup, candidates, clock="wall"):
        seen.append(("kernel", torch.get_num_threads()))
        return "eager", None

    def table(model, batch, seq, source, threads=None):
        # the table itself is measured at its own count (measure_table's num_threads), after the kernel choice
        seen.append(("table", torch.get_num_threads(), threads, source))
        return SimpleNamespace(to_dict=lambda: {"batch": batch, "seq": seq})

    monkeypatch.setattr(joint, "choose_kernel", kernel)
    monkeypatch.setattr(joint, "cost_table", table)
    monkeypatch.setattr(joint.CostTable, "from_dict", staticmethod(lambda d: d))
    stages = SimpleNamespace(get_or_compute=lambda name, key, compute, label=None: compute())
    run = SimpleNamespace(identity={}, model=tiny_model("bert"), cfg=SimpleNamespace(seed=0), stages=stages)
    cfg = JointConfig(cost_source="measured", cost_shapes="1x8", cost_threads=INNER)
    tables, key = joint.cost_tables(run, cfg)
    assert tables == [{"batch": 1, "seq": 8}] and key["threads"] == INNER
    assert seen == [("kernel", INNER), ("table", 1, INNER, "measured")]
    assert torch.get_num_threads() == 1

    def failing(*args, **kw):
        raise Boom("kernel choice failed")

    monkeypatch.setattr(joint, "choose_kernel", failing)
    with pytest.raises(Boom):
        joint.cost_tables(run, cfg)
    assert torch.get_num_threads() == 1


def test_measure_table_times_at_its_thread_count_and_restores_the_callers(one_thread, monkeypatch):
    seen = []

    def failing(runners, **kw):
        seen.append(torch.get_num_threads())
        raise Boom("timing failed")

    monkeypatch.setattr(cost_measure, "time_round_robin", failing)
    model = tiny_model("bert")
    with pytest.raises(Boom):
        cost_measure.measure_table(model, 1, 4, widths=2, reps=1, warmup=0, threads=INNER)
    assert seen == [INNER] and torch.get_num_threads() == 1
    assert not model.training  # measure_table puts back the mode it found
