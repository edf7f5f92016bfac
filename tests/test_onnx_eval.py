"""Scoring ONNX files on a task (cahp.deploy.runtime, cahp evaluate --onnx): fp32 makes the PyTorch model's
predictions, int8 stays close, and files that do not fit are refused with one line."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import TensorProto, helper

import cahp
from cahp.cli import main as cli_main
from cahp.data.tasks import get_task
from cahp.deploy.onnx import export_onnx
from cahp.deploy.quantize import INT8_RTOL, quantize_int8
from cahp.deploy.runtime import OnnxClassifier, OnnxModelError
from cahp.train.evaluate import evaluate_task

from .tiny import tiny_model

WORDS = [f"w{i}" for i in range(94)]
PATTERN = {0: [1], 1: [0, 1, 2, 3], 2: [0, 3]}  # uneven heads, layer 1 empty


pytestmark = pytest.mark.usefixtures("one_thread")


def word_tokenizer(path):
    """A word-level BERT tokenizer over `WORDS` (ids 5.. after the five special tokens), saved in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return transformers.BertTokenizer(vocab_file=str(vocab), do_lower_case=False)


def pruned_classifier(family="bert", num_labels=3, seed=0):
    """A tiny pruned classifier whose predictions vary with the input.

    The default initialisation (std 0.02) makes every input's pooled state nearly the same, so one class
    wins everywhere; weights of std 1/sqrt(fan_in) and unit embeddings spread the logits as a trained model's.
    """
    model = tiny_model(family, num_labels=num_labels, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, m.in_features**-0.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0, 1.0, generator=g)
    return cahp.remove_heads(model, PATTERN)


def centre_logits(model, tok, texts):
    """Shift the classifier's bias so the mean logit over ``texts`` is zero: every class then wins somewhere.

    Where the pooled token is the first one ([CLS] / <s>, the same for every input) its state varies little
    between inputs in a random model, and one class would otherwise win everywhere.
    """
    head = model.classifier.out_proj if hasattr(model.classifier, "out_proj") else model.classifier
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        head.bias.sub_(model(**batch).logits.mean(0))
    return model


def task_folder(path, n_test=120, pairs=False, seed=0):
    """A 3-class task of random word sequences (labels random: only agreement between runtimes matters)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 30), ("dev", 30), ("test", n_test)):
        rows = []
        for i in range(n):
            row = {"text": " ".join(rng.choice(WORDS, size=rng.integers(1, 20))), "label": i % 3}
            if pairs:
                row["text_b"] = " ".join(rng.choice(WORDS, size=rng.integers(1, 8)))
            rows.append(row)
        (path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def saved(tmp_path):
    """A pruned tiny BERT saved with its tokenizer, its fp32 and int8 exports, and a task folder."""
    model = pruned_classifier()
    tok = word_tokenizer(tmp_path / "tok")
    folder = cahp.save_pruned(model, tok, tmp_path / "pruned")
    fp32 = export_onnx(model, tmp_path / "m.onnx")
    return {"model": model, "tok": tok, "folder": folder, "fp32": fp32, "int8": quantize_int8(fp32),
            "task": task_folder(tmp_path / "task")}


@pytest.mark.parametrize("family, pairs", [("bert", True), ("roberta", False), ("mpnet", True)])
def test_fp32_onnx_scores_equal_torch(tmp_path, family, pairs):
    """Same batching, same predictions, so the same scores and intervals; with and without segment ids."""
    model = pruned_classifier(family)
    tok = word_tokenizer(tmp_path / "tok")
    kw = {"text_pair_column": "text_b"} if pairs else {}
    task = get_task(str(task_folder(tmp_path / "task", pairs=pairs)), **kw)
    centre_logits(model, tok, [e.text for e in task.load("test")])
    onnx_model = OnnxClassifier(export_onnx(model, tmp_path / "m.onnx"), threads=1)
    ref = evaluate_task(model, tok, task, n_bootstrap=200, keep_predictions=True, batch_size=16)["test"]
    got = evaluate_task(onnx_model, tok, task, n_bootstrap=200, keep_predictions=True, batch_size=16)["test"]
    assert got["predictions"] == ref["predictions"]
    assert got == ref  # every metric and interval, exactly
    assert len(set(ref["predictions"])) > 1  # a model predicting one class would make this test vacuous


def test_onnx_logits_match_torch_on_padded_batches(saved):
    """The predictor on a padded batch (several lengths) against the PyTorch model."""
    batch = saved["tok"](["w1 w2 w3", "w4 " * 17, "w9"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = saved["model"](**batch).logits
    got = OnnxClassifier(saved["fp32"], threads=1).logits(dict(batch))
    assert got.shape == ref.shape == (3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # without segment ids the graph gets zeros, as the PyTorch model assumes
    no_tt = {k: v for k, v in batch.items() if k != "token_type_ids"}
    torch.testing.assert_close(OnnxClassifier(saved["fp32"], threads=1).logits(no_tt), ref, atol=1e-4, rtol=0)


def test_int8_onnx_scores_close_to_torch(saved):
    task = get_task(str(saved["task"]))
    ref = evaluate_task(saved["model"], saved["tok"], task, n_bootstrap=200, keep_predictions=True)["test"]
    got = evaluate_task(OnnxClassifier(saved["int8"], threads=1), saved["tok"], task, n_bootstrap=200,
                        keep_predictions=True)["test"]
    same = np.mean(np.asarray(got["predictions"]) == np.asarray(ref["predictions"]))
    assert same >= 0.9  # rounding flips few predictions of a classifier whose logits are apart
    assert abs(got["accuracy"] - ref["accuracy"]) <= 0.05
    assert set(got) == set(ref) and got["n"] == ref["n"]


def test_cli_evaluate_onnx_equals_torch(saved, capsys):
    common = ["--model", str(saved["folder"]), "--task", str(saved["task"]), "--bootstrap", "200"]
    assert cli_main(["evaluate", *common]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert cli_main(["evaluate", *common, "--onnx", str(saved["fp32"])]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["onnx"] == str(saved["fp32"]) and got["splits"] == ref["splits"]
    assert cli_main(["evaluate", *common, "--onnx", str(saved["int8"])]) == 0
    q = json.loads(capsys.readouterr().out)["splits"]["test"]
    assert abs(q["accuracy"] - ref["splits"]["test"]["accuracy"]) <= 0.05
    assert q["accuracy_ci95"][0] <= q["accuracy"] <= q["accuracy_ci95"][1]


def foreign_graph(path, name="pixel_values", dtype=TensorProto.FLOAT, output="logits"):
    """A one-node ONNX graph (Identity) with one input of another name or type, or another output."""
    x = helper.make_tensor_value_info(name, dtype, ["batch", "sequence"])
    y = helper.make_tensor_value_info(output, dtype, ["batch", "sequence"])
    graph = helper.make_graph([helper.make_node("Identity", [name], [output])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_cli_evaluate_onnx_errors(saved, tmp_path, capsys):
    common = ["evaluate", "--model", str(saved["folder"]), "--task", str(saved["task"]), "--onnx"]
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a graph")
    cases = [
        (tmp_path / "missing.onnx", "does not exist"),
        (bad, "not an ONNX model"),
        (foreign_graph(tmp_path / "image.onnx"), "takes inputs ['pixel_values']"),
        (foreign_graph(tmp_path / "float.onnx", name="input_ids"), "non-integer inputs"),
        (foreign_graph(tmp_path / "h.onnx", name="input_ids", dtype=TensorProto.INT64, output="hidden"), "not logits"),
    ]
    two = export_onnx(pruned_classifier(num_labels=2), tmp_path / "two.onnx")
    cases.append((two, "2 output(s) but the task needs 3"))
    for path, message in cases:
        assert cli_main([*common, str(path)]) == 2, path
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_ids_beyond_the_graph_vocabulary_are_one_line(saved):
    """A tokenizer of another model: ids the graph's embedding lacks fail with a message, not a traceback."""
    batch = {"input_ids": torch.tensor([[2, 500, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(OnnxModelError, match="tokenizer of another model"):
        OnnxClassifier(saved["fp32"], threads=1).logits(batch)


# --- cahp bench --onnx --int8: the int8 copy timed beside PyTorch fp32 and ONNX fp32 -------------------------


def test_bench_models_times_int8_beside_fp32(tmp_path):
    from cahp.bench.config import BenchConfig
    from cahp.bench.latency import bench_models
    from cahp.bench.report import format_table

    dense = pruned_classifier()  # the figures need only a model with heads left to remove
    half = cahp.remove_heads(copy.deepcopy(dense), {0: [0], 2: [1]})
    cfg = BenchConfig(shapes="1x8,2x16", threads=1, kernel="eager", reps=3, warmup=1, onnx=True, int8=True)
    result = bench_models(dense, {"half": half}, cfg, onnx_dir=tmp_path)
    labels = {"dense", "half", "no_attention"}
    assert set(result["int8"]) == labels
    assert all(0 <= c["relative_diff"] <= INT8_RTOL and 0 <= c["argmax_agreement"] <= 1
               for c in result["int8"].values())
    assert sorted(p.name for p in tmp_path.glob("*.int8.onnx")) == sorted(f"{k}.int8.onnx" for k in labels)
    for run in result["runs"]:
        # one thread: every runtime interleaved, so the ratios to the dense PyTorch call are paired
        assert set(run["timings"]) == labels | {p + k for p in ("onnx:", "onnx-int8:") for k in labels}
        assert run["runtimes_interleaved"] is True
        assert all(len(t) == 3 for t in run["times_ms"].values())
        assert set(run["int8_ratio"]) == set(run["int8_fp32_ratio"]) == labels
        assert all(r > 0 for r in run["int8_ratio"].values())
        lo, hi = run["int8_ratio_ci95"]["half"]
        assert 0 < lo <= hi
        assert "onnx-int8:half" in run["floor_relative"]
    text = format_table(result)
    assert "int8 onnx / pytorch dense latency: dense" in text and "int8 copies checked" in text


def test_cli_bench_int8(saved, tmp_path, capsys):
    dense = tmp_path / "dense"
    tiny_model("bert").save_pretrained(dense)
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(dense), "--pruned", str(saved["folder"]), "--shapes", "1x8", "--threads", "1",
            "--reps", "2", "--warmup", "0", "--kernel", "eager", "--out", str(out)]
    assert cli_main([*argv, "--onnx", "--int8"]) == 0
    assert "int8 onnx / pytorch dense latency: dense" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["runs"][0]["int8_ratio"]) == {"dense", "pruned", "no_attention"}
    assert cli_main([*argv, "--int8"]) == 2
    assert "add --onnx" in capsys.readouterr().err


# --- benchmarks/bench_deploy.py: the four systems, scored and timed, and the goal -------------------------------


def test_bench_deploy_quick_on_tiny_folders(saved, tmp_path, capsys):
    from benchmarks import bench_deploy, make_results

    dense = cahp.save_pruned(tiny_model("bert"), saved["tok"], tmp_path / "dense")
    out = tmp_path / "deploy.json"
    result = bench_deploy.main(["--dense", str(dense), "--pruned", str(saved["folder"]), "--task", str(saved["task"]),
                                "--quick", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["meta"]["git_revision"] and written["settings"]["quick"] is True
    assert set(written["accuracy"]["scores"]) == set(bench_deploy.SYSTEMS)
    acc = written["accuracy"]
    assert acc["n"] == min(bench_deploy.QUICK_EXAMPLES, 120)
    # the ONNX fp32 file scored is the one timed, and it predicts as the PyTorch model does
    assert acc["agreement_with_pruned_torch"]["pruned_onnx"] == 1.0
    assert acc["scores"]["pruned_onnx"]["accuracy"] == acc["scores"]["pruned_torch"]["accuracy"]
    assert set(written["latency"]) == {"1x32", "4x16"}
    for shape in written["latency"].values():
        cells = shape["systems"]
        assert cells["dense_torch"]["ratio_to_dense"] == 1.0 and shape["interleaved"] is True
        assert all(c["n"] == 3 and c["median_ms"] > 0 and len(c["ratio_to_dense_ci95"]) == 2 for c in cells.values())
    assert written["goal"]["verdict"] in ("met", "missed", "undecided")
    text = bench_deploy.render(written)
    assert text == bench_deploy.render(result) and "**Goal** (issue 20)" in text
    for label, _ in bench_deploy.SYSTEMS.values():
        assert f"| {label} |" in text
    assert "deploy_minilm_sst5" in [stem for stem, module, _ in make_results.SECTIONS if module == "bench_deploy"]
    assert "**Goal**" in capsys.readouterr().out


def _goal_inputs(ratio, ratio_ci, diff, diff_ci):
    latency = {"1x32": {"systems": {"pruned_int8": {"ratio_to_dense": ratio, "ratio_to_dense_ci95": ratio_ci}}}}
    return latency, {"int8_minus_fp32": {"diff": diff, "ci95": diff_ci}}


@pytest.mark.parametrize(
    "ratio_ci, diff_ci, speed, accuracy, verdict",
    [
        ([0.20, 0.30], [-0.008, 0.004], "met", "met", "met"),
        ([0.20, 0.40], [-0.008, 0.004], "undecided", "met", "undecided"),
        ([0.35, 0.40], [-0.008, 0.004], "missed", "met", "missed"),
        ([0.20, 0.30], [-0.02, 0.0], "met", "undecided", "undecided"),
        ([0.20, 0.30], [-0.03, -0.015], "met", "missed", "missed"),
        ([float("nan")] * 2, [-0.008, 0.004], "met", "met", "met"),  # no interval: the point decides
    ],
)
def test_bench_deploy_goal_verdicts(ratio_ci, diff_ci, speed, accuracy, verdict):
    from benchmarks.bench_deploy import goal

    g = goal(*_goal_inputs(0.25, ratio_ci, -0.002, diff_ci))
    assert (g["speed"], g["accuracy"], g["verdict"]) == (speed, accuracy, verdict)
    assert goal({}, _goal_inputs(0.25, ratio_ci, -0.002, diff_ci)[1])["speed"] == "not measured"
