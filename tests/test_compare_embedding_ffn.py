"""`cahp compare --objective embedding --ffn` (issue 22): the joint peers at equal estimated speed, no labels."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cahp.pipelines import compare_embedding, compare_embedding_ffn
from cahp.pipelines.compare import CompareConfig, run_compare
from cahp.pipelines.compare_embedding import run_compare_embedding
from cahp.pipelines.compare_embedding_ffn import run_compare_embedding_ffn
from cahp.pipelines.embedding import prepare_embedding, salience_loss
from cahp.pipelines.embedding_joint import embedding_joint_run
from cahp.pipelines.joint_config import JointConfig, JointSetupError
from cahp.pipelines.stages import PruneConfig
from cahp.selectors.joint_base import check_selection
from cahp.selectors.joint_methods import RandomJoint
from cahp.selectors.label_free import LabelFreeJointFisher
from cahp.selectors.registry import make_joint_method
from cahp.train.finetune import FinetuneConfig

from .test_embedding import lively_sentence_folder, sentences, task_folder

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = JointConfig(cost_source="macs", cost_shapes="1x12,4x16", grid_points=6, min_share=0.3, speedup_budget=0.05)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random BERT sentence-transformers folder whose heads move the embeddings (test_embedding's)."""
    return lively_sentence_folder(tmp_path_factory.mktemp("st") / "src")


@pytest.fixture
def no_labelled_loss(monkeypatch):
    """Every labelled loss of the statistics raises: a run that reads a label fails."""
    def refuse(*a, **k):
        raise AssertionError("the labelled loss was used")

    from cahp.stats import fisher, neurons, salience
    for module in (fisher, neurons, salience):
        monkeypatch.setattr(module, "labelled_loss", refuse)


def _setup(tmp_path, folder, **ccfg):
    """Texts from a plain text file; the --task folder has no label column (it must never be read)."""
    text = tmp_path / "texts.txt"
    text.write_text("\n".join(sentences(150, seed=4)) + "\n")
    task = tmp_path / "unlabelled"
    task.mkdir()
    (task / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(20)))
    sim = task_folder(tmp_path / "sim", pairs=True, seed=1)
    cfg = PruneConfig(model=str(folder), task=str(task), objective="embedding", ffn=True, text_file=str(text),
                      similarity_task=str(sim), output_dir=str(tmp_path / "run"), curve_examples=24,
                      calibration_examples=32, stats_batch_size=16, seed=0)
    ft = FinetuneConfig(epochs=1, lr=2e-3, batch_size=16, max_length=16, max_train_examples=40, seed=0)
    ccfg = CompareConfig(**{"methods": ["random"], "speedups": [2.0], "knee": False, "seeds": 2,
                            "n_bootstrap": 200, **ccfg})
    return cfg, ft, ccfg


def test_compare_embedding_ffn_end_to_end(tmp_path, folder, no_labelled_loss, monkeypatch):
    cfg, ft, ccfg = _setup(tmp_path, folder)
    report = run_compare_embedding_ffn(cfg, ft, ccfg, joint=FAST, progress=False).report
    out = tmp_path / "run"
    for name in ("compare_ffn.json", "compare_ffn.md", "frontier.png"):
        assert (out / name).is_file(), name
    assert not (out / "report.json").exists()  # a comparison is not a prune run
    assert report["ffn"] and report["score"] == "spearman" and report["partial"] is False
    assert report["excluded"] == {} and set(report["settings"]["label_free"]) == {"cahp", "random"}
    assert [t["label"] for t in report["targets"]] == ["2x"] and report["targets"][0]["share"] == 0.5
    res = report["results"]["2x"]
    assert list(res) == ["cahp", "random"]
    # the same estimated speed: every method within the target share, at the same target
    for m in res:
        assert res[m]["estimated_share"] <= 0.5 + 1e-9 and res[m]["heads"] < 12 and res[m]["neurons"] < 3 * 64
        assert set(res[m]["measured_speedup"]) == {"1x12", "4x16"}
        for part in ("no_finetune", "finetuned"):
            assert -1 <= res[m][part]["spearman"] <= 1
        assert res[m]["finetuned"]["seeds"] == [0, 1] and len(res[m]["finetuned"]["spearman_per_seed"]) == 2
        # the distillation starts from the pruned model and keeps its most faithful epoch (the start included)
        assert res[m]["finetuned"]["heldout_fidelity"] >= res[m]["no_finetune"]["heldout_fidelity"] - 1e-4
    assert "vs_cahp" not in res["cahp"]["no_finetune"] and "vs_cahp" not in res["cahp"]["finetuned"]
    assert res["cahp"]["no_finetune"]["seeds"] == [] and res["random"]["no_finetune"]["seeds"] == [0, 1]
    for part in ("no_finetune", "finetuned"):
        v = res["random"][part]["vs_cahp"]
        assert v["pooled"]["verdict"] in ("win", "tie", "loss") and len(v["per_seed"]) == 2
        lo, hi = v["pooled"]["ci95"]
        assert lo <= v["pooled"]["diff"] <= hi
    dense = report["dense"]
    assert dense["heads"] == 12 and dense["neurons"] == 3 * 64 and dense["heldout_fidelity"] == 1.0
    assert set(dense["vs_cahp"]) == {"2x"} and res["cahp"]["parameters"] < dense["parameters"]
    assert report["data"]["similarity_test_pairs"] == 40 and report["texts"].endswith("texts.txt")
    md = (out / "compare_ffn.md").read_text()
    assert "## 2x (estimated share 0.500, the shapes' mean)" in md and "| random |" in md and "Dense minus CAHP" in md
    assert "- Cost tables, macs: at " in md and "one neuron" in md  # what the tables priced a unit at
    assert json.loads((out / "compare_ffn.json").read_text())["results"] == report["results"]

    # again, through `run_compare`'s dispatch: every result from the caches, nothing distilled, the same numbers
    monkeypatch.setattr(compare_embedding, "distill", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re")))
    again = run_compare(cfg, ft, ccfg, joint=FAST, progress=False).report
    # 3 selections (cahp once, random per seed) and 4 distillations (2 methods x 2 seeds)
    assert again["timings"]["results_computed"] == 0 and again["timings"]["results_cached"] == 7
    assert again["results"] == report["results"] and again["dense"] == report["dense"]
    assert all(t["cached"] for t in again["timings"]["stages"].values())


def test_label_free_joint_fisher_differentiates_the_embedding_loss(tmp_path, folder, no_labelled_loss):
    cfg, ft, _ = _setup(tmp_path, folder)
    run = prepare_embedding(cfg, ft, tmp_path / "run", progress=False)
    jr = embedding_joint_run(run, FAST, progress=False)
    loss = salience_loss(run.targets["calibration"], run.settings, run.distance, cfg.seed)
    registered = make_joint_method("fisher")
    method = LabelFreeJointFisher(loss_fn=loss)
    assert method.name == "fisher" and method.settings() == registered.settings()
    gh, gn = method.batch_gradients(jr.problem)
    b = len(run.calibration_batches)
    assert gh.shape == (b, 3, 4) and gn.shape == (b, 3, 64) and bool((gn.abs() > 0).any())
    assert method.batch_gradients(jr.problem) == (gh, gn)  # collected once for the model and batches
    # the same loss as the neuron pass: the per-batch gradients' mean squares are the problem's Fisher diagonals
    torch.testing.assert_close(gh.square().mean(0), torch.as_tensor(jr.problem.head_fisher).double(),
                               rtol=1e-3, atol=1e-10)
    sel = method.select(0.5, jr.problem)
    assert check_selection(sel, jr.problem, 0.5) <= 0.5 + 1e-9
    assert sel.info["objective"] >= sel.info["objective_searched"] - 1e-12  # the rearrangement never worsens it
    with pytest.raises(AssertionError, match="labelled loss"):  # the registered one would read labels
        registered.select(0.5, jr.problem)
    with pytest.raises(ValueError, match="loss_fn"):
        LabelFreeJointFisher().batch_gradients(jr.problem)


def test_a_peer_not_known_to_be_label_free_is_left_out(tmp_path, folder, monkeypatch):
    cfg, ft, ccfg = _setup(tmp_path, folder, finetune=False, seeds=1)
    monkeypatch.setattr(compare_embedding_ffn, "LABEL_FREE",
                        {k: v for k, v in compare_embedding_ffn.LABEL_FREE.items() if k is not RandomJoint})
    report = run_compare_embedding_ffn(cfg, ft, ccfg, joint=FAST, progress=False).report
    assert list(report["results"]["2x"]) == ["cahp"] and "without labels" in report["excluded"]["random"]
    assert "left out: random" in (tmp_path / "run" / "compare_ffn.md").read_text()
    assert "finetuned" not in report["results"]["2x"]["cahp"]


def test_bad_combinations_fail_before_work(tmp_path, folder):
    cfg, ft, ccfg = _setup(tmp_path, folder)
    for change, c, match in (({"keep": 3}, ccfg, "--speedups"),
                             ({}, dataclasses.replace(ccfg, speedups=[0.5]), "above 1"),
                             ({}, dataclasses.replace(ccfg, speedups=[], knee=False), "no target"),
                             ({}, dataclasses.replace(ccfg, methods=["magnitude"]), "no joint"),
                             ({"similarity_task": "none"}, ccfg, "similarity-task"),
                             ({}, dataclasses.replace(ccfg, seeds=0), "seeds")):
        with pytest.raises(ValueError, match=match):
            run_compare(dataclasses.replace(cfg, **change), ft, c, joint=FAST, progress=False)
    with pytest.raises(JointSetupError, match="linkage"):
        run_compare(cfg, ft, ccfg, joint=dataclasses.replace(FAST, linkage="nope"), progress=False)
    with pytest.raises(ValueError, match="heads only"):
        run_compare_embedding(cfg, ft, ccfg)
    assert not (tmp_path / "run").exists()  # refused before the output folder was made


def test_cli_compare_objective_embedding_ffn(tmp_path, folder, capsys):
    from cahp.cli import main

    cfg, _, _ = _setup(tmp_path, folder)
    rc = main(["compare", "--objective", "embedding", "--ffn", "--model", cfg.model, "--task", cfg.task,
               "--text-file", cfg.text_file, "--similarity-task", cfg.similarity_task, "--curve-examples", "24",
               "--calibration-examples", "32", "--stats-batch-size", "16", "--no-knee", "--speedups", "1.5",
               "--seeds", "1", "--no-finetune", "--methods", "layer-drop", "--max-length", "16",
               "--n-bootstrap", "100", "--cost-source", "macs", "--cost-shapes", "1x12", "--grid-points", "4",
               "--speedup-budget", "0", "--output-dir", cfg.output_dir])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("1.5x: cahp ") and "layer-drop" in printed and "CAHP " in printed
    report = json.loads((tmp_path / "run" / "compare_ffn.json").read_text())
    assert list(report["results"]["1.5x"]) == ["cahp", "layer-drop"]
    assert report["results"]["1.5x"]["layer-drop"]["info"]["layers_kept"] >= 1
