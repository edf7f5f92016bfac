"""Bad task data, each in a tiny file: a one-line TaskError naming file, line and problem, or the right result."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cahp.data.tasks import Example, Task, TaskError, get_task


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def error(exc: pytest.ExceptionInfo[TaskError], path: Path | None, line: int | None, *words: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    if path is not None:
        assert str(path) in msg, msg
    if line is not None:
        assert f"line {line}:" in msg and exc.value.line == line, msg
    for w in words:
        assert w in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "name, text",
    [("train.csv", "text,label\na,pos\nb, \nc,neg\n"), ("train.tsv", "text\tlabel\na\tpos\nb\t\nc\tneg\n")],
)
def test_blank_label(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path))
    error(exc, path, 3, "blank label in column 'label'")


def test_blank_label_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": "  "}]))
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path))
    error(exc, path, 2, "blank label")


def test_boolean_label(tmp_path: Path) -> None:
    path = write(tmp_path / "train.jsonl", jsonl([{"text": "a", "label": 1}, {"text": "b", "label": True}]))
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path))
    error(exc, path, 2, "label must be a string or a number, got True")


def test_one_class(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\na,pos\nb,pos\n")
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path))
    error(exc, path, None, "only one class ('pos')", "at least two")


def test_one_class_present_with_label_names(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "text,label\na,pos\nb,pos\nc,pos\n")
    write(tmp_path / "dev.csv", "text,label\nd,neg\n")
    task = get_task(str(tmp_path), label_names=["neg", "pos"])
    with pytest.raises(TaskError) as exc:
        task.validate()
    error(exc, tmp_path / "train.csv", None, "split 'train'", "only one class ('pos')")


def test_gapped_integer_labels_are_mapped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "train.csv", "text,label\na,1\nb,2\nc,2\n")
    path = write(tmp_path / "dev.csv", "text,label\nd,2\ne,0\n")
    with caplog.at_level(logging.WARNING):
        task = get_task(str(tmp_path))
    assert "are not 0..1" in caplog.text and "1 -> 0, 2 -> 1" in caplog.text
    assert task.label_names == ("1", "2") and task.num_labels == 2
    assert [e.label for e in task.load("train")] == [0, 1, 1]
    with pytest.raises(TaskError) as exc:
        task.load("dev")
    error(exc, path, 3, "unknown label '0'", "1, 2")


def test_integral_floats_are_classes(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "text,label\na,0.0\nb,1.0\nc,1\n")
    task = get_task(str(tmp_path))
    assert task.task_type == "classification" and task.label_names == ("0", "1")
    assert sorted(e.label for e in task.load("train") + task.load("dev")) == [0, 1, 1]


def test_many_integer_classes_hint_regression(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "train.csv", "text,label\n" + "".join(f"t{i},{i}\n" for i in range(25)))
    with caplog.at_level(logging.WARNING):
        task = get_task(str(tmp_path))
    assert task.num_labels == 25 and "--task-type regression" in caplog.text


# ------------------------------------------------------------------------------------------ regression


def test_float_labels_make_regression(tmp_path: Path) -> None:
    scores = [round(0.137 * i, 3) for i in range(37)]  # 37 distinct values: not 37 classes
    write(tmp_path / "train.tsv", "text\tlabel\n" + "".join(f"t{i}\t{s}\n" for i, s in enumerate(scores)))
    write(tmp_path / "test.tsv", "text\tlabel\nx\t2\ny\t4.5\n")
    task = get_task(str(tmp_path))
    assert (task.task_type, task.num_labels, task.label_names) == ("regression", 1, ("label",))
    assert task.load("test") == [Example("x", None, 2.0), Example("y", None, 4.5)]
    assert all(isinstance(e.label, float) for e in task.load("train"))
    info = task.validate()
    assert info["test"] == {"n": 2, "mean": 3.25, "std": 1.25, "min": 2.0, "max": 4.5}


def test_regression_forced_on_integers(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "text,label\na,1\nb,3\nc,5\n")
    task = get_task(str(tmp_path), task_type="regression")
    assert task.is_regression
    assert sorted(e.label for e in task.load("train") + task.load("dev")) == [1.0, 3.0, 5.0]


def test_regression_needs_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\na,1.5\nb,high\n")
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path), task_type="regression")
    error(exc, path, 3, "label 'high' is not a number")


def test_stray_word_among_scores(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\na,1.5\nb,nan\nc,2.25\n")
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path))
    error(exc, path, 3, "label 'nan' is not a number, but other labels are scores")


def test_bad_score_in_test_split(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "text,label\na,1.5\nb,2.5\nc,0.5\n")
    path = write(tmp_path / "test.csv", "text,label\nd,1.0\ne,inf\n")
    task = get_task(str(tmp_path))
    with pytest.raises(TaskError) as exc:
        task.validate()  # before any work, not after fine-tuning
    error(exc, path, 3, "score must be a finite number, got 'inf'")


def test_classification_refuses_fractions(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\na,1\nb,2.5\n")
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path), task_type="classification")
    error(exc, path, 3, "label '2.5' is not an integer class", "--task-type regression")


def test_constant_scores(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "text,label\na,2.5\nb,2.5\n")
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path), task_type="regression")
    error(exc, path, None, "every score is the same")


def test_unknown_task_type(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "text,label\na,1\nb,0\n")
    with pytest.raises(TaskError, match="unknown task type 'ordinal'"):
        get_task(str(tmp_path), task_type="ordinal")


def test_label_names_with_regression(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "text,label\na,1\nb,0\n")
    with pytest.raises(TaskError, match="label_names applies to classification"):
        get_task(str(tmp_path), task_type="regression", label_names=["a", "b"])


# --------------------------------------------------------------------------------------------- texts


def test_empty_text(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", 'text,label\na,0\n"  ",1\n')
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path))
    error(exc, path, 3, "empty text in field 'text'")


def test_empty_pair_text(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", "a\tb\tlabel\nx\ty\t0\nx\t\t1\n")
    with pytest.raises(TaskError) as exc:
        get_task(str(tmp_path), text_column="a", text_pair_column="b")
    error(exc, path, 3, "empty text in field 'b'")


def test_bad_line_in_test_file_found_by_validate(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "text,label\na,0\nb,1\n")
    write(tmp_path / "dev.csv", "text,label\nc,0\n")
    path = write(tmp_path / "test.csv", "text,label\nd,0\ne,1,extra\n")
    task = get_task(str(tmp_path))  # the test file is read later
    with pytest.raises(TaskError) as exc:
        task.validate()
    error(exc, path, 3, "expected 2 comma-separated columns")


def test_validate_checks_examples_of_any_loader() -> None:
    examples = {"train": [Example("a", None, 0), Example(" ", None, 1)], "dev": [Example("c", None, 0)]}
    task = Task("hand", 2, ("x", "y"), ("train", "dev"), "train", "dev", "dev", loader=examples.__getitem__)
    with pytest.raises(TaskError, match=r"task 'hand', split 'train', example 2: empty text"):
        task.validate()
    pairs = {"train": [Example("a", "b", 0), Example("c", None, 1)], "dev": [Example("c", "d", 0)]}
    task = Task("p", 2, ("x", "y"), ("train", "dev"), "train", "dev", "dev", is_pair=True, loader=pairs.__getitem__)
    with pytest.raises(TaskError, match="example 2: empty second text"):
        task.validate()
    bad = {"train": [Example("a", None, 0), Example("b", None, 2)]}
    task = Task("r", 2, ("x", "y"), ("train",), "train", "train", "train", loader=bad.__getitem__)
    with pytest.raises(TaskError, match=r"example 2: label 2 is not a class id 0..1"):
        task.load("train")


def test_validate_warns_about_classes_missing_from_train(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "train.csv", "text,label\na,neg\nb,pos\nc,pos\n")
    write(tmp_path / "test.csv", "text,label\nd,mid\n")
    task = get_task(str(tmp_path), label_names=["neg", "mid", "pos"])
    with caplog.at_level(logging.WARNING):
        info = task.validate()
    assert info["test"] == {"n": 1, "label_counts": [0, 1, 0]}
    assert "split 'test'" in caplog.text and "mid" in caplog.text and "training split lacks" in caplog.text


# --------------------------------------------------------------------------------------------- pairs


@pytest.mark.parametrize("pair", ["text_pair", "sentence2", "hypothesis", "#2 String"])
def test_pair_like_column_without_option_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture, pair: str) -> None:
    write(tmp_path / "train.tsv", f"text\t{pair}\tlabel\na\tb\t0\nc\td\t1\n")
    with caplog.at_level(logging.WARNING):
        task = get_task(str(tmp_path))
    assert not task.is_pair
    assert f"--text-pair-column '{pair}'" in caplog.text and "looks like the second text" in caplog.text


def test_pair_option_silences_the_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "train.tsv", "#1 String\t#2 String\tQuality\na\tb\t0\nc\td\t1\n")
    with caplog.at_level(logging.WARNING):
        task = get_task(str(tmp_path), text_column="#1 String", text_pair_column="#2 String", label_column="Quality")
    assert task.is_pair and task.load("train")[0] == Example("a", "b", 0)
    assert "second text" not in caplog.text


# -------------------------------------------------------------------------------------------- STS-B


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


def stsb_row(i: int, score: str, s1: str = "a man plays", s2: str = "a man sings") -> str:
    return f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{s1} {i}\t{s2}\t{score}\n"


def make_stsb(root: Path, train_scores: list[str], dev_scores: list[str]) -> Path:
    glue = root / "glue" / "STS-B"
    write(glue / "train.tsv", STSB_HEADER + "".join(stsb_row(i, s) for i, s in enumerate(train_scores)))
    write(glue / "dev.tsv", STSB_HEADER + "".join(stsb_row(i, s) for i, s in enumerate(dev_scores)))
    return glue


def test_stsb_splits(tmp_path: Path) -> None:
    make_stsb(tmp_path, [f"{i * 0.25:.3f}" for i in range(20)], ["5.000", "0.0"])
    task = get_task("stsb", data_dir=tmp_path)
    assert (task.task_type, task.num_labels, task.is_pair) == ("regression", 1, True)
    assert len(task.load("train")) == 18 and len(task.load("dev")) == 2
    test = task.load("test")
    assert test == [Example("a man plays 0", "a man sings", 5.0), Example("a man plays 1", "a man sings", 0.0)]
    assert get_task("STS-B", data_dir=tmp_path, task_type="regression").name == "stsb"
    assert get_task("stsb", data_dir=tmp_path, text_column=None).name == "stsb"  # unset options are ignored


@pytest.mark.parametrize("score, words", [("5.5", "score 5.5 out of range 0.0..5.0"), ("x", "got 'x'")])
def test_stsb_bad_score(tmp_path: Path, score: str, words: str) -> None:
    glue = make_stsb(tmp_path, ["1.0", "2.0", "3.0"], ["1.0", score])
    with pytest.raises(TaskError) as exc:
        get_task("stsb", data_dir=tmp_path).validate()
    error(exc, glue / "dev.tsv", 3, words)


def test_builtin_task_type_mismatch(tmp_path: Path) -> None:
    make_stsb(tmp_path, ["1.0", "2.0", "3.0"], ["1.0"])
    with pytest.raises(TaskError, match="task 'stsb' is a regression task, not classification"):
        get_task("stsb", data_dir=tmp_path, task_type="classification")
