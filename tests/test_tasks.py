"""Tests for cahp.data.tasks: unit tests on tiny synthetic files, integration tests on the real data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cahp.data import folder
from cahp.data.tasks import (
    Example,
    TaskError,
    available_tasks,
    get_task,
    holdout_indices,
    parse_sst_tree,
    resolve_data_dir,
)

REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tsv(header: str, rows: list[str]) -> str:
    return "\n".join([header, *rows]) + "\n"


def assert_error(exc: pytest.ExceptionInfo[TaskError], path: Path, line: int | None, *words: str) -> None:
    msg = str(exc.value)
    assert str(path) in msg, msg
    if line is not None:
        assert f"line {line}:" in msg, msg
        assert exc.value.line == line
    for w in words:
        assert w in msg, msg


# ------------------------------------------------------------------------------------------ trees


class TestTreeParsing:
    def test_simple(self) -> None:
        assert parse_sst_tree("(3 (2 It) (4 (4 rocks) (2 .)))") == (3, "It rocks .")

    def test_single_leaf(self) -> None:
        assert parse_sst_tree("(1 Bad)") == (1, "Bad")

    def test_unescape(self) -> None:
        label, text = parse_sst_tree(r"(2 (2 -LRB-) (2 (2 a\/b) (2 \*\*)) (2 -RRB-) (2 ``) (2 q) (2 ''))")
        assert label == 2
        assert text == "( a/b ** ) `` q ''"

    def test_leaf_with_space(self) -> None:
        # SST has leaves such as "(2 2 1\/2)"; the words are kept in order.
        assert parse_sst_tree(r"(2 (2 2 1\/2) (2 stars))") == (2, "2 1/2 stars")

    @pytest.mark.parametrize(
        "line, reason",
        [
            ("(3 (2 a)", "unbalanced"),
            ("(3 (2 a)))", "after the end"),
            ("(x (2 a))", "invalid node label"),
            ("(7 a)", "invalid node label"),
            ("(3 (9 a))", "invalid node label"),
            ("3 a", "must start with"),
            ("(3 (2 a) ())", "empty node"),
            ("(3)", "without children"),
            ("(3 ((2 a)))", "missing node label"),
            ("(3 (2 a)) trailing", "after the end"),
            ("   ", "empty tree"),
        ],
    )
    def test_malformed(self, line: str, reason: str) -> None:
        with pytest.raises(ValueError, match=reason):
            parse_sst_tree(line)


def make_sst5(root: Path, train: list[str] | None = None) -> Path:
    train = train or ["(4 (4 Great) (2 film))", "(0 (0 Awful) (2 .))", "(2 (2 So) (2 so))", "(1 meh)"]
    write(root / "sst5" / "train.txt", "\n".join(train) + "\n")
    write(root / "sst5" / "dev.txt", "(3 (3 good) (2 (2 -LRB-) (2 fun) (2 -RRB-)))\n(1 bad)\n")
    write(root / "sst5" / "test.txt", "(2 fine)\n(4 (4 wow))\n(0 no)\n")
    return root


class TestSST5:
    def test_load(self, tmp_path: Path) -> None:
        task = get_task("sst5", data_dir=make_sst5(tmp_path))
        assert (task.num_labels, task.splits, task.dev_split, task.test_split) == (
            5,
            ("train", "dev", "test"),
            "dev",
            "test",
        )
        assert task.label_names[0] == "very negative" and task.label_names[4] == "very positive"
        assert task.load("train")[0] == Example("Great film", None, 4)
        assert [e.label for e in task.load("train")] == [4, 0, 2, 1]
        assert task.load("dev")[0].text == "good ( fun )"
        assert len(task.load("test")) == 3
        assert not task.is_pair

    def test_alias(self, tmp_path: Path) -> None:
        assert get_task("SST-5", data_dir=make_sst5(tmp_path)).name == "sst5"

    def test_bad_tree_names_file_and_line(self, tmp_path: Path) -> None:
        make_sst5(tmp_path, ["(4 good)", "(4 (2 broken)", "(1 x)"])
        with pytest.raises(TaskError) as exc:
            get_task("sst5", data_dir=tmp_path).load("train")
        assert_error(exc, tmp_path / "sst5" / "train.txt", 2, "unparseable tree", "unbalanced")

    def test_blank_line_is_an_error(self, tmp_path: Path) -> None:
        make_sst5(tmp_path, ["(4 good)", "", "(1 x)"])
        with pytest.raises(TaskError) as exc:
            get_task("sst5", data_dir=tmp_path).load("train")
        assert_error(exc, tmp_path / "sst5" / "train.txt", 2, "blank line")

    def test_empty_file(self, tmp_path: Path) -> None:
        make_sst5(tmp_path)
        write(tmp_path / "sst5" / "test.txt", "")
        with pytest.raises(TaskError) as exc:
            get_task("sst5", data_dir=tmp_path).load("test")
        assert_error(exc, tmp_path / "sst5" / "test.txt", None, "empty file")

    def test_bad_utf8(self, tmp_path: Path) -> None:
        make_sst5(tmp_path)
        (tmp_path / "sst5" / "dev.txt").write_bytes(b"(2 ok)\n(2 \xff)\n")
        with pytest.raises(TaskError) as exc:
            get_task("sst5", data_dir=tmp_path).load("dev")
        assert_error(exc, tmp_path / "sst5" / "dev.txt", 2, "UTF-8")

    def test_missing_file(self, tmp_path: Path) -> None:
        make_sst5(tmp_path)
        (tmp_path / "sst5" / "dev.txt").unlink()
        with pytest.raises(TaskError) as exc:
            get_task("sst5", data_dir=tmp_path)
        assert_error(exc, tmp_path / "sst5" / "dev.txt", None, "--data-dir", "CAHP_DATA_DIR", "not found")

    def test_missing_data_dir(self, tmp_path: Path) -> None:
        with pytest.raises(TaskError, match="--data-dir") as exc:
            get_task("sst5", data_dir=tmp_path / "nowhere")
        assert "nowhere" in str(exc.value) and "CAHP_DATA_DIR" in str(exc.value)

    def test_missing_data_dir_from_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CAHP_DATA_DIR", str(tmp_path / "envdir"))
        with pytest.raises(TaskError, match="CAHP_DATA_DIR environment variable") as exc:
            get_task("sst5")
        assert "envdir" in str(exc.value)

    def test_no_data_dir_at_all(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(folder, "_resolve_data_dir_with_source", lambda d=None: (None, "nothing"))
        with pytest.raises(TaskError, match="no data directory found.*--data-dir"):
            get_task("sst5")


# ------------------------------------------------------------------------------- registry, splits


def test_available_tasks() -> None:
    assert available_tasks() == ["mnli", "mnli-small", "rte", "sst2", "sst5", "stsb"]


def test_unknown_task() -> None:
    with pytest.raises(TaskError, match="unknown task 'nope'.*sst5"):
        get_task("nope")


def test_unknown_split_lists_valid_ones(tmp_path: Path) -> None:
    task = get_task("sst5", data_dir=make_sst5(tmp_path))
    with pytest.raises(TaskError, match="no split 'validation'.*train, dev, test"):
        task.load("validation")


def test_unknown_option(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bogus"):
        get_task("sst5", data_dir=make_sst5(tmp_path), bogus=1)


def test_load_is_cached_and_returns_copies(tmp_path: Path) -> None:
    task = get_task("sst5", data_dir=make_sst5(tmp_path))
    first = task.load("train")
    first.clear()
    (tmp_path / "sst5" / "train.txt").unlink()  # served from the cache now
    assert len(task.load("train")) == 4


class TestResolveDataDir:
    def test_explicit_wins(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CAHP_DATA_DIR", "/env/dir")
        assert resolve_data_dir(tmp_path) == tmp_path

    def test_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CAHP_DATA_DIR", "/env/dir")
        assert resolve_data_dir() == Path("/env/dir")

    def test_next_to_cwd(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CAHP_DATA_DIR", raising=False)
        (tmp_path / "shared" / "data").mkdir(parents=True)
        (tmp_path / "proj").mkdir()
        monkeypatch.chdir(tmp_path / "proj")
        assert resolve_data_dir() == (tmp_path / "shared" / "data").resolve()

    def test_next_to_repo_root(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CAHP_DATA_DIR", raising=False)
        monkeypatch.chdir(tmp_path)
        repo = tmp_path / "x" / "repo"
        (tmp_path / "x" / "shared" / "data").mkdir(parents=True)
        monkeypatch.setattr(folder, "_repo_root", lambda: repo)
        assert resolve_data_dir() == (tmp_path / "x" / "shared" / "data").resolve()

    def test_none(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CAHP_DATA_DIR", raising=False)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(folder, "_repo_root", lambda: tmp_path / "a" / "b")
        assert resolve_data_dir() is None


# --------------------------------------------------------------------------------------- hold-out


class TestHoldout:
    def test_pinned_values(self) -> None:
        # The hold-out must never change between versions or machines: pin it.
        assert sorted(holdout_indices(20, 0.1)) == [6, 8]
        assert sorted(holdout_indices(100, 0.1)) == [6, 8, 17, 23, 33, 55, 58, 69, 77, 89]

    @pytest.mark.parametrize("n, frac, k", [(2, 0.1, 1), (10, 0.1, 1), (67349, 0.05, 3367), (3, 0.9, 2)])
    def test_size(self, n: int, frac: float, k: int) -> None:
        assert len(holdout_indices(n, frac)) == k

    def test_too_small(self) -> None:
        with pytest.raises(TaskError, match="cannot hold out"):
            holdout_indices(1, 0.1)


# ------------------------------------------------------------------------------------------ SST-2


def make_glue_sst2(root: Path, n: int = 40) -> Path:
    rows = [f"sentence number {i} \t{i % 2}" for i in range(n)]
    write(root / "glue" / "SST-2" / "train.tsv", tsv("sentence\tlabel", rows))
    write(root / "glue" / "SST-2" / "dev.tsv", tsv("sentence\tlabel", ["a fine film\t1", "a dull film\t0"]))
    return root


class TestSST2:
    def test_glue_holdout(self, tmp_path: Path) -> None:
        task = get_task("sst2", data_dir=make_glue_sst2(tmp_path))
        train, dev, test = (task.load(s) for s in ("train", "dev", "test"))
        assert (len(train), len(dev), len(test)) == (38, 2, 2)
        assert [e.text for e in dev] == ["sentence number 8", "sentence number 33"]  # pinned hold-out
        assert {e.text for e in train}.isdisjoint(e.text for e in dev)
        assert sorted(e.text for e in train + dev) == sorted(f"sentence number {i}" for i in range(40))
        assert test[0] == Example("a fine film", None, 1)
        # deterministic across task instances
        again = get_task("sst2", data_dir=tmp_path)
        assert again.load("dev") == dev and again.load("train") == train

    def test_quotes_are_not_special_in_tsv(self, tmp_path: Path) -> None:
        make_glue_sst2(tmp_path)
        write(tmp_path / "glue" / "SST-2" / "dev.tsv", tsv("sentence\tlabel", ['"a "quoted\tthing\t1']))
        with pytest.raises(TaskError) as exc:
            get_task("sst2", data_dir=tmp_path).load("test")
        assert_error(exc, tmp_path / "glue" / "SST-2" / "dev.tsv", 2, "expected 2 tab-separated columns")
        write(tmp_path / "glue" / "SST-2" / "dev.tsv", tsv("sentence\tlabel", ['"a "quoted thing\t1']))
        assert get_task("sst2", data_dir=tmp_path).load("test")[0].text == '"a "quoted thing'

    def test_label_out_of_range(self, tmp_path: Path) -> None:
        make_glue_sst2(tmp_path)
        write(tmp_path / "glue" / "SST-2" / "dev.tsv", tsv("sentence\tlabel", ["ok\t1", "bad\t2"]))
        with pytest.raises(TaskError) as exc:
            get_task("sst2", data_dir=tmp_path).load("test")
        assert_error(exc, tmp_path / "glue" / "SST-2" / "dev.tsv", 3, "out of range")

    def test_header_only_is_empty(self, tmp_path: Path) -> None:
        make_glue_sst2(tmp_path)
        write(tmp_path / "glue" / "SST-2" / "dev.tsv", "sentence\tlabel\n")
        with pytest.raises(TaskError) as exc:
            get_task("sst2", data_dir=tmp_path).load("test")
        assert_error(exc, tmp_path / "glue" / "SST-2" / "dev.tsv", None, "empty file")

    def test_missing_column(self, tmp_path: Path) -> None:
        make_glue_sst2(tmp_path)
        write(tmp_path / "glue" / "SST-2" / "dev.tsv", tsv("text\tlabel", ["ok\t1"]))
        with pytest.raises(TaskError) as exc:
            get_task("sst2", data_dir=tmp_path).load("test")
        assert_error(exc, tmp_path / "glue" / "SST-2" / "dev.tsv", 1, "'sentence'")

    def test_from_trees(self, tmp_path: Path) -> None:
        task = get_task("sst2", data_dir=make_sst5(tmp_path))
        assert "derived" in task.description
        train = task.load("train")
        assert [(e.text, e.label) for e in train] == [("Great film", 1), ("Awful .", 0), ("meh", 0)]
        assert [e.label for e in task.load("test")] == [1, 0]

    def test_nothing_there(self, tmp_path: Path) -> None:
        with pytest.raises(TaskError, match="SST-2 data.*--data-dir"):
            get_task("sst2", data_dir=tmp_path)


# -------------------------------------------------------------------------------------------- RTE


def make_rte(root: Path, n: int = 20) -> Path:
    labels = ("entailment", "not_entailment")
    rows = [f"{i}\tpremise {i}.\thypothesis {i}.\t{labels[i % 2]}" for i in range(n)]
    header = "index\tsentence1\tsentence2\tlabel"
    write(root / "glue" / "RTE" / "train.tsv", tsv(header, rows))
    write(root / "glue" / "RTE" / "dev.tsv", tsv(header, ['0\tHe said "yes.\tHe agreed.\tentailment']))
    return root


class TestRTE:
    def test_pairs_and_holdout(self, tmp_path: Path) -> None:
        task = get_task("rte", data_dir=make_rte(tmp_path))
        assert task.is_pair and task.label_names == ("entailment", "not_entailment")
        train, dev = task.load("train"), task.load("dev")
        assert (len(train), len(dev)) == (18, 2)
        assert [e.text for e in dev] == ["premise 6.", "premise 8."]
        assert train[0] == Example("premise 0.", "hypothesis 0.", 0)
        assert train[1].label == 1
        assert task.load("test") == [Example('He said "yes.', "He agreed.", 0)]

    def test_unknown_label(self, tmp_path: Path) -> None:
        make_rte(tmp_path)
        path = write(
            tmp_path / "glue" / "RTE" / "dev.tsv",
            tsv("index\tsentence1\tsentence2\tlabel", ["0\ta\tb\tmaybe"]),
        )
        with pytest.raises(TaskError) as exc:
            get_task("rte", data_dir=tmp_path).load("test")
        assert_error(exc, path, 2, "unknown label 'maybe'")


# ------------------------------------------------------------------------------------------- MNLI


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_mnli_small(root: Path, n: int = 15) -> Path:
    rows = [{"idx": i, "premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(n)]
    write(root / "mnli" / "dev_matched.jsonl", jsonl(rows))
    return root


class TestMNLISmall:
    def test_split_by_idx(self, tmp_path: Path) -> None:
        task = get_task("mnli-small", data_dir=make_mnli_small(tmp_path))
        assert task.test_split == "test" and task.is_pair and task.num_labels == 3
        assert [e.text for e in task.load("test")] == ["p0", "p5", "p10"]
        assert [e.text for e in task.load("dev")] == ["p1", "p6", "p11"]
        assert len(task.load("train")) == 9
        assert task.load("dev")[0] == Example("p1", "h1", 1)

    @pytest.mark.parametrize(
        "bad_line, reason",
        [
            ('{"idx": 1, "premise": "p", "hypothesis": "h", "label": 0', "bad JSON"),
            ('{"idx": 1, "premise": "p", "label": 0}', "missing field 'hypothesis'"),
            ('{"idx": 1, "premise": "p", "hypothesis": null, "label": 0}', "missing field 'hypothesis'"),
            ('{"idx": 1, "premise": "p", "hypothesis": "h", "label": 3}', "out of range"),
            ('{"idx": 1, "premise": "p", "hypothesis": "h", "label": -1}', "out of range"),
            ('{"idx": "1", "premise": "p", "hypothesis": "h", "label": 0}', "'idx'"),
            ("[1, 2]", "expected a JSON object"),
            ("", "blank line"),
        ],
    )
    def test_bad_lines(self, tmp_path: Path, bad_line: str, reason: str) -> None:
        path = tmp_path / "mnli" / "dev_matched.jsonl"
        good = '{"idx": 0, "premise": "p", "hypothesis": "h", "label": 0}'
        write(path, "\n".join([good, good, bad_line, good]) + "\n")
        with pytest.raises(TaskError) as exc:
            get_task("mnli-small", data_dir=tmp_path).load("train")
        assert_error(exc, path, 3, reason)


class TestMNLI:
    def test_missing_training_split(self, tmp_path: Path) -> None:
        make_mnli_small(tmp_path)
        with pytest.raises(TaskError, match="MNLI's training split is missing.*mnli-small"):
            get_task("mnli", data_dir=tmp_path, allow_hub=False)

    def test_jsonl_layout(self, tmp_path: Path) -> None:
        def rows(prefix: str, n: int) -> str:
            return jsonl([{"premise": f"{prefix}{i}", "hypothesis": "h", "label": i % 3} for i in range(n)])

        write(tmp_path / "mnli" / "train.jsonl", rows("t", 100))
        write(tmp_path / "mnli" / "validation_matched.jsonl", rows("m", 4))
        write(tmp_path / "mnli" / "validation_mismatched.jsonl", rows("mm", 5))
        task = get_task("mnli", data_dir=tmp_path, allow_hub=False)
        assert task.splits == ("train", "dev", "validation_matched", "validation_mismatched")
        assert (task.dev_split, task.test_split, task.extra_eval_splits) == (
            "dev",
            "validation_matched",
            ("validation_mismatched",),
        )
        assert (len(task.load("train")), len(task.load("dev"))) == (98, 2)
        assert len(task.load("validation_matched")) == 4
        assert len(task.load("validation_mismatched")) == 5

    def test_glue_tsv_layout(self, tmp_path: Path) -> None:
        header = "index\tgenre\tsentence1\tsentence2\tgold_label"
        labels = ("entailment", "neutral", "contradiction")
        body = [f"{i}\tfiction\tp{i}\th{i}\t{labels[i % 3]}" for i in range(50)]
        write(tmp_path / "MNLI" / "train.tsv", tsv(header, body))
        write(tmp_path / "MNLI" / "dev_matched.tsv", tsv(header, body[:3]))
        write(tmp_path / "MNLI" / "dev_mismatched.tsv", tsv(header, [*body[:2], "9\tx\tp\th\t-"]))
        task = get_task("mnli", data_dir=tmp_path, allow_hub=False)
        assert task.load("validation_matched")[2] == Example("p2", "h2", 2)
        assert len(task.load("train")) == 49
        with pytest.raises(TaskError) as exc:
            task.load("validation_mismatched")
        assert_error(exc, tmp_path / "MNLI" / "dev_mismatched.tsv", 4, "unknown label '-'")


# ------------------------------------------------------------------------------------- user tasks


class TestUserTask:
    def test_csv_string_labels(self, tmp_path: Path) -> None:
        write(tmp_path / "train.csv", 'text,label\n"hello, world",pos\nbad,neg\nmeh,neutral\nok,pos\n')
        write(tmp_path / "dev.csv", "text,label\nfine,pos\n")
        write(tmp_path / "test.csv", "text,label\nugh,neg\n")
        task = get_task(f"csv:{tmp_path}")
        assert task.label_names == ("neg", "neutral", "pos")  # sorted order
        assert task.load("train")[0] == Example("hello, world", None, 2)
        assert [e.label for e in task.load("train")] == [2, 0, 1, 2]
        assert (task.dev_split, task.test_split, task.splits) == ("dev", "test", ("train", "dev", "test"))
        assert task.load("test")[0].label == 0

    def test_unknown_label_in_test(self, tmp_path: Path) -> None:
        write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
        write(tmp_path / "dev.csv", "text,label\nc,pos\n")
        path = write(tmp_path / "test.csv", "text,label\nd,neg\ne,meh\n")
        task = get_task(str(tmp_path))
        with pytest.raises(TaskError) as exc:
            task.load("test")
        assert_error(exc, path, 3, "unknown label 'meh'")

    def test_int_labels_tsv_and_holdout(self, tmp_path: Path) -> None:
        write(tmp_path / "train.tsv", tsv("id\ttext\tlabel", [f"{i}\tt{i}\t{i % 3}" for i in range(20)]))
        task = get_task(f"csv:{tmp_path}")
        assert task.num_labels == 3 and task.label_names == ("0", "1", "2")
        assert task.splits == ("train", "dev") and task.test_split == "dev"
        assert [e.text for e in task.load("dev")] == ["t6", "t8"]
        assert len(task.load("train")) == 18

    def test_int_label_out_of_range_in_dev(self, tmp_path: Path) -> None:
        write(tmp_path / "train.tsv", tsv("text\tlabel", ["a\t0", "b\t1"]))
        path = write(tmp_path / "dev.tsv", tsv("text\tlabel", ["c\t1", "d\t2"]))
        with pytest.raises(TaskError) as exc:
            get_task(f"csv:{tmp_path}").load("dev")
        assert_error(exc, path, 3, "out of range")

    def test_jsonl_pairs_custom_columns(self, tmp_path: Path) -> None:
        rows = [{"q": f"q{i}", "a": f"a{i}", "y": "yes" if i % 2 else "no"} for i in range(10)]
        write(tmp_path / "train.jsonl", jsonl(rows))
        write(tmp_path / "validation.jsonl", jsonl(rows[:2]))
        task = get_task(f"csv:{tmp_path}", text_column="q", text_pair_column="a", label_column="y")
        assert task.is_pair and task.label_names == ("no", "yes")
        assert task.load("dev") == [Example("q0", "a0", 0), Example("q1", "a1", 1)]

    def test_label_names_option(self, tmp_path: Path) -> None:
        write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
        task = get_task(f"csv:{tmp_path}", label_names=["pos", "neg"])
        both = task.load("train") + task.load("dev")
        assert sorted((e.text, e.label) for e in both) == [("a", 0), ("b", 1)]
        assert task.label_names == ("pos", "neg")

    def test_missing_column(self, tmp_path: Path) -> None:
        path = write(tmp_path / "train.csv", "sentence,label\na,0\nb,1\n")
        with pytest.raises(TaskError) as exc:
            get_task(f"csv:{tmp_path}")
        assert_error(exc, path, 1, "missing column(s) 'text'", "'sentence'")

    def test_csv_wrong_column_count_after_multiline_record(self, tmp_path: Path) -> None:
        path = write(tmp_path / "train.csv", 'text,label\n"two\nlines",0\nok,1\nextra,1,2\n')
        with pytest.raises(TaskError) as exc:
            get_task(f"csv:{tmp_path}")
        assert_error(exc, path, 5, "expected 2 comma-separated columns")

    def test_missing_field_jsonl(self, tmp_path: Path) -> None:
        path = write(tmp_path / "train.jsonl", jsonl([{"text": "a", "label": 0}, {"text": "b"}]))
        with pytest.raises(TaskError) as exc:
            get_task(f"csv:{tmp_path}")
        assert_error(exc, path, 2, "missing field 'label'")

    def test_empty_train(self, tmp_path: Path) -> None:
        path = write(tmp_path / "train.jsonl", "")
        with pytest.raises(TaskError) as exc:
            get_task(f"csv:{tmp_path}")
        assert_error(exc, path, None, "empty file")

    def test_no_train_file(self, tmp_path: Path) -> None:
        write(tmp_path / "dev.csv", "text,label\na,0\n")
        with pytest.raises(TaskError, match="no training file"):
            get_task(f"csv:{tmp_path}")

    def test_ambiguous_files(self, tmp_path: Path) -> None:
        write(tmp_path / "train.csv", "text,label\na,0\nb,1\n")
        write(tmp_path / "train.tsv", "text\tlabel\na\t0\n")
        with pytest.raises(TaskError, match="ambiguous"):
            get_task(f"csv:{tmp_path}")

    def test_missing_folder(self, tmp_path: Path) -> None:
        with pytest.raises(TaskError, match="does not exist"):
            get_task(f"csv:{tmp_path / 'nope'}")


# ------------------------------------------------------------------------------------ real data

real = pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real data not available")


def label_counts(examples: list[Example], k: int) -> list[int]:
    c = Counter(e.label for e in examples)
    return [c[i] for i in range(k)]


@pytest.mark.integration
@real
class TestRealData:
    def test_sst5(self) -> None:
        task = get_task("sst5", data_dir=REAL_DATA)
        expected = {
            "train": (8544, [1092, 2218, 1624, 2322, 1288]),
            "dev": (1101, [139, 289, 229, 279, 165]),
            "test": (2210, [279, 633, 389, 510, 399]),
        }
        for split, (n, counts) in expected.items():
            examples = task.load(split)
            assert len(examples) == n
            assert label_counts(examples, 5) == counts
        texts = [e.text for e in task.load("train")]
        assert not any("-LRB-" in t or "-RRB-" in t or "\\/" in t for t in texts)
        assert sum("(" in t for t in texts) > 0

    def test_mnli_small(self) -> None:
        task = get_task("mnli-small", data_dir=REAL_DATA)
        sizes = [len(task.load(s)) for s in ("train", "dev", "test")]
        assert sizes == [5889, 1963, 1963]
        all_examples = task.load("train") + task.load("dev") + task.load("test")
        assert label_counts(all_examples, 3) == [3479, 3123, 3213]
        assert all(e.text_pair for e in all_examples)

    def test_sst2_glue(self) -> None:
        task = get_task("sst2", data_dir=REAL_DATA)
        train, dev, test = (task.load(s) for s in ("train", "dev", "test"))
        assert (len(train), len(dev), len(test)) == (63982, 3367, 872)
        assert set(label_counts(test, 2)) == {428, 444}

    def test_sst2_from_real_trees(self, tmp_path: Path) -> None:
        (tmp_path / "sst5").symlink_to((REAL_DATA / "sst5").resolve())
        task = get_task("sst2", data_dir=tmp_path)
        assert [len(task.load(s)) for s in ("train", "dev", "test")] == [6920, 872, 1821]

    def test_rte(self) -> None:
        task = get_task("rte", data_dir=REAL_DATA)
        train, dev, test = (task.load(s) for s in ("train", "dev", "test"))
        assert (len(train), len(dev), len(test)) == (2241, 249, 277)
        assert all(e.text and e.text_pair for e in train + dev + test)
        assert {e.label for e in test} == {0, 1}

    def test_mnli_needs_training_split(self) -> None:
        with pytest.raises(TaskError, match="mnli-small"):
            get_task("mnli", data_dir=REAL_DATA, allow_hub=False)

    def test_stsb(self) -> None:
        task = get_task("stsb", data_dir=REAL_DATA)
        assert (task.task_type, task.num_labels, task.is_pair) == ("regression", 1, True)
        info = task.validate()  # every split parsed and checked
        assert [info[s]["n"] for s in ("train", "dev", "test")] == [5174, 575, 1500]  # 5,749 train, 1,500 dev
        assert all(0.0 <= info[s]["min"] < info[s]["max"] <= 5.0 for s in info)
        test = task.load("test")
        assert all(isinstance(e.label, float) and e.text and e.text_pair for e in test)
        assert len({e.label for e in test}) > 37  # scores, not classes
        assert task.split_files["test"].name == "dev.tsv"

    def test_validate_builtin_tasks(self) -> None:
        for name in ("sst5", "rte", "mnli-small"):
            info = get_task(name, data_dir=REAL_DATA).validate()
            assert all(min(v["label_counts"]) > 0 for v in info.values()), name
