"""Distillation from the dense model's outputs in the fine-tuning after pruning (`cahp.train.teacher`)."""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cahp.data.batching import encode, iter_batches
from cahp.pipelines import compare, compare_ffn
from cahp.pipelines import stages as pipeline
from cahp.pipelines.compare import CompareConfig, run_compare
from cahp.pipelines.prune import run_prune
from cahp.train.finetune import FinetuneConfig, check_config, finetune
from cahp.train.teacher import (
    KD_FIELDS,
    DistillationLoss,
    finetune_key,
    labels_only,
    teacher_key,
    teacher_outputs,
)

from .test_compare_ffn import FAST
from .test_compare_ffn import _cfgs as ffn_cfgs
from .test_finetune_evaluate import CharTokenizer, toy_regression_task, toy_task  # noqa: F401 - fixtures
from .test_pipeline import _cfgs as prune_cfgs
from .test_pipeline import tiny_setup  # noqa: F401 - fixture
from .tiny import tiny_model


def test_keys_leave_the_distillation_out_until_it_is_used():
    """Every cache key made before the distillation settings existed still matches a run without them."""
    plain = FinetuneConfig()
    assert finetune_key(plain) == {k: v for k, v in asdict(plain).items() if k not in KD_FIELDS}
    assert teacher_key(plain) == {}
    kd = replace(plain, kd_alpha=0.5, kd_temperature=3.0)
    assert finetune_key(kd) == asdict(kd)
    assert teacher_key(kd) == {"teacher": {"kd_alpha": 0.5, "kd_temperature": 3.0}}
    assert finetune_key(labels_only(kd)) == finetune_key(replace(plain, kd_temperature=3.0))  # labels only


class Fixed(nn.Module):
    """A 'model' whose logits are given rows of a table, looked up by the batch's ``input_ids[:, 0]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _batch(n: int, labels) -> dict:
    return {"input_ids": torch.arange(n)[:, None], "attention_mask": torch.ones(n, 1, dtype=torch.long),
            "index": torch.arange(n), "labels": torch.as_tensor(labels)}


def test_the_loss_mixes_the_label_loss_and_hintons_tempered_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    batch, model, t = _batch(6, labels), Fixed(student), 2.0
    ce = nn.functional.cross_entropy(student, labels)
    p = torch.softmax(teacher / t, -1)
    kl = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    for alpha in (0.25, 1.0):
        got = DistillationLoss(teacher, alpha, t, regression=False)(model, batch, torch.device("cpu"))
        torch.testing.assert_close(got, (1 - alpha) * ce + alpha * kl)
    # a student that already gives the teacher's outputs has nothing to learn from it
    same = DistillationLoss(student, 1.0, t, regression=False)(model, batch, torch.device("cpu"))
    assert abs(same.item()) < 1e-6
    # regression: squared errors against the label and against the teacher's output
    reg_s, reg_t, y = torch.randn(6, 1), torch.randn(6, 1), torch.randn(6)
    got = DistillationLoss(reg_t, 0.5, t, regression=True)(Fixed(reg_s), _batch(6, y), torch.device("cpu"))
    want = 0.5 * ((reg_s[:, 0] - y) ** 2).mean() + 0.5 * ((reg_s[:, 0] - reg_t[:, 0]) ** 2).mean()
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="kd_alpha must be in"):
        DistillationLoss(teacher, 0.0, t, regression=False)


def _kl_to(teacher: nn.Module, student: nn.Module, task) -> float:
    """Mean KL(teacher || student) over the task's dev examples."""
    ds = encode(CharTokenizer(), task.load(task.dev_split), 64)
    t = teacher_outputs(teacher, ds, 64, 0, progress=False)
    s = teacher_outputs(student, ds, 64, 0, progress=False)
    return float(nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                      reduction="batchmean"))


def test_finetuning_with_the_teacher_alone_brings_the_student_to_it_and_leaves_the_teacher_alone(toy_task):  # noqa: F811
    teacher = tiny_model("bert", num_labels=2, seed=5)
    frozen = copy.deepcopy(teacher.state_dict())
    cfg = FinetuneConfig(epochs=3, lr=3e-3, batch_size=16, patience=0, seed=0, kd_alpha=1.0, kd_temperature=1.0)
    student = tiny_model("bert", num_labels=2, seed=0)
    before = _kl_to(teacher, student, toy_task)
    res = finetune(student, CharTokenizer(), toy_task, cfg, teacher=teacher, progress=False)
    assert _kl_to(teacher, student, toy_task) < 0.5 * before, (before, res.history)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert res.config["kd_alpha"] == 1.0
    # deterministic, and not the labels-only fine-tuning
    again = finetune(tiny_model("bert", num_labels=2, seed=0), CharTokenizer(), toy_task, cfg, teacher=teacher,
                     progress=False)
    plain = finetune(tiny_model("bert", num_labels=2, seed=0), CharTokenizer(), toy_task, labels_only(cfg),
                     teacher=teacher, progress=False)
    assert again.history[0]["train_loss"] == res.history[0]["train_loss"] != plain.history[0]["train_loss"]


def test_a_regression_student_moves_toward_the_teachers_outputs(toy_regression_task):  # noqa: F811
    task = toy_regression_task
    teacher = tiny_model("bert", num_labels=1, seed=5)
    ds = encode(CharTokenizer(), task.load(task.train_split), 64)

    def gap(student) -> float:
        return float(((teacher_outputs(student, ds, 64, 0, progress=False)
                       - teacher_outputs(teacher, ds, 64, 0, progress=False)) ** 2).mean())

    student = tiny_model("bert", num_labels=1, seed=0)
    before = gap(student)
    cfg = FinetuneConfig(epochs=2, lr=3e-3, batch_size=16, patience=0, seed=0, kd_alpha=1.0)
    finetune(student, CharTokenizer(), task, cfg, teacher=teacher, progress=False)
    assert gap(student) < 0.5 * before


def test_bad_distillation_settings_fail_before_any_work(toy_task):  # noqa: F811
    with pytest.raises(ValueError, match=r"kd_alpha must be in \[0, 1\]"):
        check_config(FinetuneConfig(kd_alpha=1.5))
    with pytest.raises(ValueError, match="kd_temperature must be > 0"):
        check_config(FinetuneConfig(kd_alpha=0.5, kd_temperature=0.0))
    with pytest.raises(ValueError, match="pass it as teacher"):
        finetune(tiny_model("bert", num_labels=2), CharTokenizer(), toy_task, FinetuneConfig(kd_alpha=0.5),
                 progress=False)
    teacher = tiny_model("bert", num_labels=3)
    with pytest.raises(ValueError, match="the teacher has 3 output"):
        finetune(tiny_model("bert", num_labels=2), CharTokenizer(), toy_task, FinetuneConfig(kd_alpha=0.5),
                 teacher=teacher, progress=False)


def test_teacher_outputs_are_in_dataset_order(toy_task):  # noqa: F811
    model = tiny_model("bert", num_labels=2)
    ds = encode(CharTokenizer(), toy_task.load(toy_task.dev_split), 64)
    out = teacher_outputs(model, ds, 7, 0, progress=False)
    model.eval()
    with torch.no_grad():
        for batch in iter_batches(ds, 5, shuffle=True, seed=1, pad_token_id=0):
            ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch.get("token_type_ids")).logits
            torch.testing.assert_close(out[batch["index"]], ref, atol=1e-5, rtol=0)


def _spy(monkeypatch, module) -> list:
    """Record (kd_alpha, teacher given) of every `finetune` call through ``module``."""
    calls, real = [], module.finetune

    def spy(model, tok, task, cfg, **kw):
        calls.append((cfg.kd_alpha, kw.get("teacher") is not None))
        return real(model, tok, task, cfg, **kw)

    monkeypatch.setattr(module, "finetune", spy)
    return calls


def test_prune_distils_its_final_fine_tuning_only_and_keeps_the_dense_stage(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    cfg, ft = prune_cfgs(tiny_setup, out, keep=6)
    first = run_prune(cfg, ft, progress=False).report
    calls = _spy(monkeypatch, pipeline)
    again = run_prune(replace(cfg, overwrite=True), replace(ft, kd_alpha=0.5), progress=False).report
    # the dense model, its statistics and the selection are the folder's; the final fine-tuning distils
    assert calls == [(0.5, True)]
    assert again["kept_heads"] == first["kept_heads"]
    assert again["settings"]["finetune"]["kd_alpha"] == 0.5
    calls.clear()
    run_prune(replace(cfg, overwrite=True), replace(ft, kd_alpha=0.5), progress=False)
    assert calls == []  # cached under its own key


def test_compare_ffn_distils_every_fine_tuning_alike_from_the_cached_selections(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    cfg, ft = ffn_cfgs(tiny_setup, out)
    ccfg = CompareConfig(methods=["cahp", "random"], speedups=[1.5], seeds=1, knee=False, n_bootstrap=50)
    first = run_compare(cfg, ft, ccfg, progress=False, joint=FAST).report
    calls = _spy(monkeypatch, compare_ffn)
    kd = run_compare(cfg, replace(ft, kd_alpha=0.5), ccfg, progress=False, joint=FAST).report
    # dense control, heads-only CAHP and both methods, each with the dense model as its teacher
    assert calls == [(0.5, True)] * 4
    for m in ("cahp", "random"):
        for what in ("heads_per_layer", "neurons_per_layer"):
            assert kd["results"]["1.5x"][m][what] == first["results"]["1.5x"][m][what]
    assert kd["dense"]["test"] == first["dense"]["test"]  # the dense model itself is not trained again
    assert sorted(p.name for p in (out / "compare-ffn").glob("ft-*-kd0.5t2.json")) == [
        "ft-cahp-1.5x-s0-kd0.5t2.json", "ft-cahp-heads-s0-kd0.5t2.json", "ft-dense-s0-kd0.5t2.json",
        "ft-random-1.5x-s0-kd0.5t2.json"]
    calls.clear()
    # the labels-only fine-tunings were kept beside them: a re-run without distillation computes nothing
    again = run_compare(cfg, ft, ccfg, progress=False, joint=FAST).report
    assert calls == [] and again["results"] == first["results"]


def test_the_heads_only_compare_distils_its_dense_control_and_methods_beside_the_labels_only_ones(
        tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    cfg, ft = prune_cfgs(tiny_setup, out)
    ft = replace(ft, epochs=1)
    ccfg = CompareConfig(methods=["cahp", "gradient"], budgets=[0.5], seeds=1, knee=False, n_bootstrap=50)
    first = run_compare(cfg, ft, ccfg, progress=False).report
    calls = _spy(monkeypatch, compare)
    run_compare(cfg, replace(ft, kd_alpha=0.5), ccfg, progress=False)
    assert calls == [(0.5, True)] * 3  # the dense control and the two methods; the dense model is the folder's
    names = sorted(p.name for p in out.rglob("ft-*-kd0.5t2.json"))
    assert names == ["ft-cahp-k6-s0-kd0.5t2.json", "ft-dense-s0-kd0.5t2.json", "ft-gradient-k6-s0-kd0.5t2.json"]
    calls.clear()
    again = run_compare(cfg, ft, ccfg, progress=False).report
    assert calls == [] and again["finetuned"] == first["finetuned"]
