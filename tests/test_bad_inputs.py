"""Bad inputs a new user would try (issue 21): each is a one-line error (exit code 2, no traceback) or a correct result.

Tiny random BERT models with a 50-word vocabulary and tiny user tasks built in tmp folders (seconds each),
run through `cahp.cli.main` as a user would, or through the Python API where the result is the point.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import cahp
from cahp.cli import main
from cahp.core.io import write_json
from cahp.data.tasks import TaskError, get_task
from cahp.model.checkpoint import CheckpointError, load_pruned, save_pruned
from cahp.pipelines import stages as prune_module  # the stage functions tests patch live there
from cahp.pipelines.guard import LOCK_NAME
from cahp.pipelines.prune import PruneConfig, run_prune
from cahp.train.finetune import FinetuneConfig

POS = ["good", "great", "fine", "nice", "superb"]
NEG = ["bad", "awful", "poor", "dull", "weak"]
FILL = ["the", "film", "was", "a", "plot", "and", "very", "story", "it", "is", "one", "man", "sat", "here"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FAST = ["--calibration-examples", "32", "--curve-examples", "30", "--stats-batch-size", "16", "--grid-step", "4",
        "--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--max-train-examples", "60", "--patience", "0"]


def _tokenizer(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + POS + NEG + FILL) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))


def _model_folder(folder: Path, num_labels: int = 2, classifier: bool = True, tokenizer: bool = True) -> Path:
    tok = _tokenizer(folder / ".tok")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  num_labels=num_labels)
    model = transformers.BertForSequenceClassification(cfg) if classifier else transformers.BertModel(cfg)
    model.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    shutil.rmtree(folder / ".tok")
    return folder


def _sentence(rng, word: str, long: bool = False) -> str:
    words = list(rng.choice(FILL, size=200 if long else rng.integers(3, 8)))
    words.insert(int(rng.integers(0, len(words))), word)
    return " ".join(words)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _classification_task(folder: Path, n=(120, 40, 40), long_example: bool = False) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, size in zip(("train", "dev", "test"), n):
        rows = []
        for i in range(size):
            y = int(rng.random() < 0.5)
            rows.append([_sentence(rng, str(rng.choice(POS if y else NEG)), long_example and i == 0), y])
        _write_csv(folder / f"{split}.csv", ["text", "label"], rows)
    return folder


def _pair_task(folder: Path, header=("premise", "hypothesis", "gold"), n=(120, 40, 40)) -> Path:
    """Entailment-like pairs: the label says whether the two texts carry words of the same polarity."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, size in zip(("train", "dev", "test"), n):
        rows = []
        for _ in range(size):
            a, same = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            b = a if same else not a
            rows.append([_sentence(rng, str(rng.choice(POS if a else NEG))),
                         _sentence(rng, str(rng.choice(POS if b else NEG))), "yes" if same else "no"])
        _write_csv(folder / f"{split}.csv", list(header), rows)
    return folder


def _regression_task(folder: Path, n=(120, 40, 40)) -> Path:
    """STS-like scores 0..5: how many positive words the pair holds, with float noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, size in zip(("train", "dev", "test"), n):
        rows = []
        for _ in range(size):
            a, b = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            score = round(float(np.clip(2.5 * (a + b) + rng.normal(0, 0.3), 0, 5)), 2)
            rows.append([_sentence(rng, str(rng.choice(POS if a else NEG))),
                         _sentence(rng, str(rng.choice(POS if b else NEG))), score])
        _write_csv(folder / f"{split}.csv", ["sentence1", "sentence2", "score"], rows)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    return {
        "model": _model_folder(root / "model"),
        "cls": _classification_task(root / "cls"),
        "pair": _pair_task(root / "pair"),
        "reg": _regression_task(root / "reg"),
        "root": root,
    }


def _cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of ``cahp ARGV``; an error must be one line without a traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.startswith("cahp ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return code, lines[0]
    return code, err


def _prune_args(setup, task, out, *extra):
    return ["prune", "--model", setup["model"], "--task", task, "--output-dir", out, *FAST, *extra]


# --- columns and pairs ---------------------------------------------------------------------------


def test_prune_and_compare_take_pair_columns(setup, tmp_path, capsys):
    """A pair task with custom column names prunes on both texts; compare takes the same options."""
    out = tmp_path / "run"
    code, err = _cli(capsys, *_prune_args(setup, setup["pair"], out, "--text-column", "premise",
                                          "--text-pair-column", "hypothesis", "--label-column", "gold",
                                          "--skip-final-finetune"))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["columns"] == {"text": "premise", "text_pair": "hypothesis", "label": "gold",
                                 "task_type": "classification"}
    assert json.loads((out / "run.json").read_text())["columns"]["text_pair"] == "hypothesis"
    assert report["settings"]["prune"]["text_pair_column"] == "hypothesis"
    code, err = _cli(capsys, "compare", "--model", setup["model"], "--task", setup["pair"], "--output-dir", out,
                     *FAST, "--text-column", "premise", "--text-pair-column", "hypothesis", "--label-column", "gold",
                     "--methods", "random", "--budgets", "0.5", "--seeds", "1", "--no-finetune", "--no-knee")
    assert code == 0, err
    assert json.loads((out / "compare.json").read_text())["settings"]["prune"]["label_column"] == "gold"


def test_pair_like_column_without_option_warns(tmp_path, caplog):
    folder = _pair_task(tmp_path / "t", header=("text", "text_pair", "label"))
    task = get_task(str(folder))
    assert not task.is_pair and "--text-pair-column 'text_pair'" in caplog.text
    assert get_task(str(folder), text_pair_column="text_pair").is_pair


def test_column_options_on_builtin_task_are_an_error(setup, tmp_path, capsys):
    code, err = _cli(capsys, *_prune_args(setup, "sst2", tmp_path / "r", "--text-column", "sentence"))
    assert code == 2 and "--text-column applies to user tasks" in err
    assert not (tmp_path / "r").exists()


# --- task types and metrics ----------------------------------------------------------------------


def test_regression_prune_reports_pearson_and_spearman(setup, tmp_path, capsys):
    """Float scores make a regression task: MSE, one output, the curve and the knee on Pearson."""
    out = tmp_path / "r"
    # the 2-label model gets a new 1-output head, fine-tuned by cahp
    code = main([str(a) for a in _prune_args(setup, setup["reg"], out, "--text-column", "sentence1",
                                             "--text-pair-column", "sentence2", "--label-column", "score")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "test pearson" in printed and "test spearman" in printed  # the summary line of cahp prune
    r = json.loads((out / "report.json").read_text())
    assert r["task_type"] == "regression" and r["metric"] == "pearson"
    for stage in ("before_pruning", "after_pruning", "after_finetune"):
        scores = r["scores"][stage]["test"]
        assert {"pearson", "spearman", "pearson_ci95", "spearman_ci95", "mse", "baseline"} <= set(scores)
        assert -1 <= scores["pearson"] <= 1
    assert all(p["metric"] == "pearson" and "accuracy" not in p for p in r["curve"])
    assert r["knee"]["k"] == r["k_star"] and r["scores"]["heldout_score_selected"] is not None


def test_metric_drives_the_curve(setup, tmp_path):
    cfg = PruneConfig(model=str(setup["model"]), task=str(setup["cls"]), output_dir=str(tmp_path / "r"),
                      calibration_examples=32, curve_examples=30, stats_batch_size=16, grid_step=4,
                      skip_final_finetune=True)
    ft = FinetuneConfig(epochs=1, lr=2e-3, batch_size=16, max_train_examples=60, metric="matthews")
    r = run_prune(cfg, ft, progress=False).report
    assert r["metric"] == "matthews" and all(p["metric"] == "matthews" and "accuracy" in p for p in r["curve"])
    assert r["knee"]["k"] == r["k_star"] and -1 <= r["scores"]["heldout_score_selected"] <= 1
    assert r["scores"]["heldout_accuracy_selected"] is None  # the held-out score is Matthews, not accuracy


def test_float_scores_are_regression_and_gaps_are_mapped(tmp_path):
    folder = _regression_task(tmp_path / "sts")
    task = get_task(str(folder), text_column="sentence1", text_pair_column="sentence2", label_column="score")
    assert task.is_regression and task.num_labels == 1
    gaps = tmp_path / "gaps"
    gaps.mkdir()
    for split in ("train", "test"):
        _write_csv(gaps / f"{split}.csv", ["text", "label"], [["good film", 1], ["bad film", 2]] * 5)
    task = get_task(str(gaps))
    assert task.num_labels == 2 and sorted({ex.label for ex in task.load("train")}) == [0, 1]


# --- broken tasks and options: errors before any work ----------------------------------------------


def _broken_task(root: Path, kind: str) -> Path:
    folder = _classification_task(root / kind)
    if kind == "bad_test_line":
        with open(folder / "test.csv", "a") as f:
            f.write('"unterminated,1\n')
    elif kind == "blank_label":
        with open(folder / "train.csv", "a") as f:
            f.write("a good film,\n")
    elif kind == "one_class":
        with open(folder / "train.csv") as f:
            rows = list(csv.reader(f))
        _write_csv(folder / "train.csv", rows[0], [[r[0], 0] for r in rows[1:]])
    elif kind == "empty_text":
        with open(folder / "dev.csv", "a") as f:
            f.write('"  ",1\n')
    return folder


@pytest.mark.parametrize("kind,message", [
    ("bad_test_line", "test"), ("blank_label", "label"), ("one_class", "only one class"), ("empty_text", "empty"),
])
def test_broken_task_fails_before_work(setup, tmp_path, capsys, monkeypatch, kind, message):
    task = _broken_task(tmp_path, kind)

    def no_finetune(*a, **k):
        raise AssertionError("fine-tuning started before the check")

    monkeypatch.setattr(prune_module, "finetune", no_finetune)
    out = tmp_path / "out"
    code, err = _cli(capsys, *_prune_args(setup, task, out))
    assert code == 2 and message in err
    assert not out.exists()  # a command that fails before producing anything leaves no folder
    code, err = _cli(capsys, "finetune", "--model", setup["model"], "--task", task, "--output-dir", tmp_path / "ft")
    assert code == 2 and message in err and not (tmp_path / "ft").exists()


@pytest.mark.parametrize("extra,message", [
    (["--keep", "13"], "cannot keep 13 heads: the model has 12"),
    (["--keep", "-1"], "--keep must be >= 0"),
    (["--keep-ratio", "-0.5"], "--keep-ratio must be in"),
    (["--keep-ratio", "1.5"], "--keep-ratio must be in"),
    (["--keep", "3", "--keep-ratio", "0.5"], "not both"),
    (["--max-train-examples", "-5"], "max_train_examples must be >= 0"),
    (["--curve-examples", "0"], "--curve-examples must be >= 1"),
    (["--curve-examples", "500"], "too few to hold out"),
    (["--metric", "pearson"], "does not apply"),
    (["--text-column", "sentence"], "sentence"),
    (["--epochs", "0"], "epochs"),
])
def test_bad_option_fails_before_work(setup, tmp_path, capsys, monkeypatch, extra, message):
    def no_finetune(*a, **k):
        raise AssertionError("fine-tuning started before the check")

    monkeypatch.setattr(prune_module, "finetune", no_finetune)
    out = tmp_path / "out"
    code, err = _cli(capsys, *_prune_args(setup, setup["cls"], out), *extra)
    assert code == 2 and message in err, err
    assert not out.exists()


def test_zero_keep_is_documented_as_unset(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "overrides the knee; 0: unset" in text


def test_max_length_above_the_model_is_clipped(setup, tmp_path, capsys, caplog):
    """--max-length 1000 on a 64-position model with a 200-word example: a warning and a correct run."""
    task = _classification_task(tmp_path / "long", long_example=True)
    code, err = _cli(capsys, "finetune", "--model", setup["model"], "--task", task, "--output-dir", tmp_path / "ft",
                     "--epochs", "1", "--max-length", "1000", "--no-test")
    assert code == 0, err
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["config"]["max_length"] == 64
    assert "--max-length 1000 is more than the model's 64 positions" in caplog.text
    code, out_err = _cli(capsys, "evaluate", "--model", tmp_path / "ft" / "model", "--task", task,
                         "--max-length", "1000", "--bootstrap", "0")
    assert code == 0, out_err


# --- models -------------------------------------------------------------------------------------


def test_model_without_tokenizer_is_an_error(tmp_path, setup, capsys):
    bare = _model_folder(tmp_path / "m", tokenizer=False)
    code, err = _cli(capsys, "evaluate", "--model", bare, "--task", setup["cls"])
    assert code == 2 and "no tokenizer files" in err and "vocab.txt" in err


def test_new_head_is_an_error_unless_allowed(tmp_path, setup, capsys):
    encoder = _model_folder(tmp_path / "enc", classifier=False)
    code, err = _cli(capsys, "evaluate", "--model", encoder, "--task", setup["cls"])
    assert code == 2 and "classification head would be new" in err and "--allow-new-head" in err
    code, err = _cli(capsys, "evaluate", "--model", encoder, "--task", setup["cls"], "--allow-new-head",
                     "--bootstrap", "0")
    assert code == 0, err
    three = _model_folder(tmp_path / "three", num_labels=3)  # a trained head, but for 3 classes
    code, err = _cli(capsys, *_prune_args(setup, setup["cls"], tmp_path / "p"), "--model", three, "--finetuned")
    assert code == 2 and "3 outputs" in err and not (tmp_path / "p").exists()
    code, err = _cli(capsys, "compare", "--model", encoder, "--task", setup["cls"], "--output-dir", tmp_path / "c",
                     "--finetuned", *FAST)
    assert code == 2 and "--allow-new-head" in err


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(setup):
    model, tok = cahp.load_model(str(setup["model"]), num_labels=2)
    cahp.keep_heads(model, {0: [0, 1], 1: [2, 3], 2: [1]})
    folder = setup["root"] / "pruned"
    save_pruned(model, tok, folder)
    return folder


def _edited(pruned: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(pruned, folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.__setitem__("cahp_kept_heads", "0:0,1"), "must be an object"),
    (lambda c: c["cahp_kept_heads"].__setitem__("0", [0, 0]), "lists a head twice"),
    (lambda c: c["cahp_kept_heads"].__setitem__("0", [0, 7]), "has head 7"),
    (lambda c: c["cahp_kept_heads"].__setitem__("1", "2,3"), "must be a list"),
    (lambda c: c["cahp_kept_heads"].pop("2"), "lacks layer"),
    (lambda c: c.pop("cahp_kept_heads"), "has no cahp_kept_heads"),
    (lambda c: c["cahp_kept_heads"].__setitem__("0", [2, 3]), "other heads"),  # same shapes, other heads
])
def test_malformed_kept_heads_is_a_one_line_checkpoint_error(pruned, tmp_path, capsys, edit, message):
    folder = _edited(pruned, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_pruned(folder)
    code, err = _cli(capsys, "info", "--model", folder)
    assert code == 2 and message in err and "config.json" in err


def test_truncated_weights_are_a_checkpoint_error(pruned, tmp_path, capsys):
    folder = tmp_path / "cut"
    shutil.copytree(pruned, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = _cli(capsys, "info", "--model", folder)
    assert code == 2 and "model.safetensors" in err and "incomplete metadata" in err


def test_kept_heads_travel_in_the_weights_metadata(pruned):
    import safetensors

    with safetensors.safe_open(str(pruned / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["cahp_kept_heads"]) == {"0": [0, 1], "1": [2, 3], "2": [1]}


# --- results that cannot go stale ---------------------------------------------------------------------


def _flip_labels(path: Path) -> None:
    with open(path) as f:
        rows = list(csv.reader(f))
    _write_csv(path, rows[0], [[r[0], 1 - int(r[1])] for r in rows[1:]])


def test_edited_files_rerun_exactly_their_stages(setup, tmp_path, caplog):
    task = tmp_path / "task"
    shutil.copytree(setup["cls"], task)
    cfg = PruneConfig(model=str(setup["model"]), task=str(task), output_dir=str(tmp_path / "r"),
                      calibration_examples=32, curve_examples=30, stats_batch_size=16, grid_step=4,
                      skip_final_finetune=True)
    ft = FinetuneConfig(epochs=1, lr=2e-3, batch_size=16, max_train_examples=60)
    first = run_prune(cfg, ft, progress=False).report
    cached = {k: v["cached"] for k, v in run_prune(cfg, ft, progress=False).report["stage_seconds"].items()}
    assert all(cached.values()), cached
    _flip_labels(task / "test.csv")  # only the evaluations read it
    st = run_prune(cfg, ft, progress=False).report["stage_seconds"]
    assert st["finetune_dense"]["cached"] and st["signatures"]["cached"] and st["curve"]["cached"]
    assert not st["evaluate_dense"]["cached"] and not st["surgery_and_finetune"]["cached"]
    _flip_labels(task / "train.csv")  # every stage read it (dev is a hold-out of it)
    r = run_prune(cfg, ft, progress=False).report
    assert not any(v["cached"] for v in r["stage_seconds"].values()), r["stage_seconds"]
    assert "changed since the last run" in caplog.text
    assert r["fingerprints"]["train"] != first["fingerprints"]["train"]
    assert r["fingerprints"]["model"] == first["fingerprints"]["model"]


def test_rerun_with_other_final_settings_needs_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "r"
    assert _cli(capsys, *_prune_args(setup, setup["cls"], out, "--skip-final-finetune"))[0] == 0
    report = (out / "report.json").read_bytes()
    model = (out / "model" / "model.safetensors").read_bytes()
    for extra in (["--keep", "5"], ["--knee-method", "curvature"], ["--clustering", "agglomerative"]):
        code, err = _cli(capsys, *_prune_args(setup, setup["cls"], out, "--skip-final-finetune", *extra))
        assert code == 2 and "--overwrite" in err and "differ" in err, err
    assert (out / "report.json").read_bytes() == report
    assert (out / "model" / "model.safetensors").read_bytes() == model
    code, err = _cli(capsys, *_prune_args(setup, setup["cls"], out, "--skip-final-finetune", "--keep", "5",
                                          "--overwrite"))
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["heads_kept"] == 5


def test_lock_refuses_a_second_run_and_takes_over_a_dead_one(setup, tmp_path, capsys, caplog):
    import socket

    out = tmp_path / "r"
    out.mkdir()
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    write_json(out / LOCK_NAME, live)
    code, err = _cli(capsys, *_prune_args(setup, setup["cls"], out, "--skip-final-finetune"))
    assert code == 2 and f"another cahp run (pid {os.getppid()}" in err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    write_json(out / LOCK_NAME, {**live, "pid": int(dead.stdout)})
    code, err = _cli(capsys, *_prune_args(setup, setup["cls"], out, "--skip-final-finetune"))
    assert code == 0, err
    assert "is gone" in caplog.text and not (out / LOCK_NAME).exists()


# --- files --------------------------------------------------------------------------------------------


def test_outputs_honour_the_umask(tmp_path, setup):
    old = os.umask(0o002)
    try:
        model, tok = cahp.load_model(str(setup["model"]), num_labels=2)
        save_pruned(model, tok, tmp_path / "m")
        write_json(tmp_path / "x.json", {"a": 1})
        from cahp.core.io import save_tensors

        save_tensors(tmp_path / "t.pt", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "m" / "config.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "t.pt").stat().st_mode & 0o777 == 0o664


def test_bench_reps_zero_is_an_error(setup, capsys):
    code, err = _cli(capsys, "bench", "--model", setup["model"], "--reps", "0")
    assert code == 2 and "--reps must be at least 1" in err


def test_task_errors_name_the_file(tmp_path):
    folder = _broken_task(tmp_path, "bad_test_line")
    with pytest.raises(TaskError, match="test.csv"):
        get_task(str(folder)).validate()


# --- integration: RTE's files as a user's own pair task --------------------------------------------------


def _rte_as_user_task(folder: Path) -> Path | None:
    from cahp.data.tasks import resolve_data_dir

    data = resolve_data_dir()
    src = data / "glue" / "RTE" if data else None
    if src is None or not (src / "train.tsv").is_file():
        return None
    folder.mkdir(parents=True)

    def rows(path, start, n):
        lines = [ln.split("\t") for ln in path.read_text().splitlines()[1:]]
        return [[a, b, lab] for _, a, b, lab in lines[start:start + n]]  # index, sentence1, sentence2, label

    header = ["premise", "hypothesis", "gold"]
    _write_csv(folder / "train.csv", header, rows(src / "train.tsv", 0, 240))
    _write_csv(folder / "dev.csv", header, rows(src / "train.tsv", 240, 60))
    _write_csv(folder / "test.csv", header, rows(src / "dev.tsv", 0, 60))
    return folder


@pytest.mark.integration
def test_prune_and_compare_on_rte_as_a_user_pair_task(tmp_path, capsys):
    task = _rte_as_user_task(tmp_path / "rte")
    if task is None:
        pytest.skip("RTE data not found")
    cols = ["--text-column", "premise", "--text-pair-column", "hypothesis", "--label-column", "gold"]
    small = ["--calibration-examples", "32", "--curve-examples", "32", "--grid-step", "24", "--epochs", "1",
             "--max-train-examples", "48", "--batch-size", "16", "--max-length", "64"]
    out = tmp_path / "run"
    code, err = _cli(capsys, "prune", "--model", "minilm-l6", "--task", task, "--output-dir", out, *cols, *small)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["columns"]["text_pair"] == "hypothesis" and report["data"]["test_split"] == "test"
    assert report["scores"]["after_finetune"]["test"]["n"] == 60
    code, err = _cli(capsys, "compare", "--model", "minilm-l6", "--task", task, "--output-dir", out, *cols, *small,
                     "--methods", "random", "--budgets", "0.5", "--seeds", "1", "--no-dense-control")
    assert code == 0, err
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["timings"]["stages"]["finetune_dense"]["cached"]
    assert set(cmp["finetuned"]["results"]["50%"]) == {"cahp", "random"}


def test_regression_joint_curve_is_on_pearson_with_a_loss(setup, tmp_path, capsys):
    """`--ffn` on a regression task: the curve's score is Pearson (not the accuracy of float equality, always 0)
    and every candidate carries its held-out squared error, which picks the head weight (where every error is at
    or above the targets' variance, the hidden-state fidelity does)."""
    out = tmp_path / "rj"
    code, err = _cli(capsys, *_prune_args(setup, setup["reg"], out, "--text-column", "sentence1",
                                          "--text-pair-column", "sentence2", "--label-column", "score", "--ffn",
                                          "--cost-source", "macs", "--cost-shapes", "1x16", "--grid-points", "4",
                                          "--speedup-budget", "0", "--skip-final-finetune"))
    assert code == 0, err
    curve = json.loads((out / "report.json").read_text())["curve"]
    assert any(p["accuracy"] != 0 for p in curve) and all(-1 <= p["accuracy"] <= 1 for p in curve)
    for p in curve:
        assert p["loss"] > 0 and p["decided_by"] in ("loss", "fidelity")
        if p["decided_by"] == "loss":
            assert p["loss"] == min(c["loss"] for c in p["candidates"]) and not p["collapsed"]
        else:
            assert p["fidelity"] == max(c["fidelity"] for c in p["candidates"]) and p["collapsed"]
