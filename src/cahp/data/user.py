"""User tasks: a folder with ``train.{csv,tsv,jsonl}`` and optional ``dev.*`` (or ``validation.*``), ``test.*``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cahp.data.holdout import Lazy, holdout_indices, holdout_loader
from cahp.data.readers import INT_RE, float_label, parse_number, read_table, text_field
from cahp.data.types import TASK_TYPES, Example, Task, TaskError

logger = logging.getLogger(__name__)

_USER_EXTS = (".csv", ".tsv", ".jsonl")


def _find_split_file(folder: Path, stems: Sequence[str]) -> Path | None:
    found = [folder / f"{s}{ext}" for s in stems for ext in _USER_EXTS if (folder / f"{s}{ext}").is_file()]
    if len(found) > 1:
        raise TaskError(
            f"ambiguous split files in {folder}: {', '.join(p.name for p in found)}; keep only one"
        )
    return found[0] if found else None


#: Column names that usually hold the second text of a pair; a file with one of them but no pair column
#: option gets a warning (the pair would be dropped silently otherwise). Compared case-insensitively.
PAIR_LIKE_COLUMNS = (
    "text_pair", "text_b", "text2", "sentence2", "sentence_b", "hypothesis", "question2", "#2 string",
)
#: More integer classes than this, with the task type left to detection, gets a hint that they may be scores.
MANY_CLASSES = 20

_Raw = list[tuple[int, str, "str | None", Any]]


@dataclass(frozen=True)
class _Labels:
    """How raw labels become :class:`Example` labels; decided once, from the training split.

    ``mode``: ``"names"`` (a label is one of ``names``), ``"int"`` (the integer is the class id),
    ``"mapped"`` (sorted integer values -> ids 0..K-1) or ``"score"`` (a float, regression).
    """

    mode: str
    names: tuple[str, ...]
    train_file: str
    named_ints: bool = False  # "names" mode only: an integer may stand for a class id (label_names given)

    @property
    def task_type(self) -> str:
        return "regression" if self.mode == "score" else "classification"

    def convert(self, value: Any, path: Path, ln: int) -> int | float:
        """The label of one line (file and line name any problem)."""
        if self.mode == "score":
            return float_label(value, path, ln)
        if self.mode in ("int", "mapped"):
            number = parse_number(value)
            if number is None or not float(number).is_integer():
                raise TaskError(f"label must be an integer, got {value!r}", path, ln)
            if self.mode == "int":
                if not 0 <= number < len(self.names):
                    raise TaskError(f"label {int(number)} out of range 0..{len(self.names) - 1}", path, ln)
                return int(number)
            value = str(int(number))
        s = str(value).strip()
        if s in self.names:
            return self.names.index(s)
        if self.named_ints and INT_RE.fullmatch(s) and 0 <= int(s) < len(self.names):
            return int(s)
        raise TaskError(
            f"unknown label {value!r} (labels of the training split {self.train_file}: {', '.join(self.names)})",
            path,
            ln,
        )


def _decide_labels(
    raw: _Raw, path: Path, label_names: Sequence[str] | None, task_type: str | None, folder: Path
) -> _Labels:
    """Choose the label scheme from the training split's raw labels (see :func:`make_user_task`)."""
    numbers = [parse_number(v) for _, _, _, v in raw]
    if label_names is not None:
        if task_type == "regression":
            raise TaskError("label_names applies to classification tasks, not to a regression task")
        names = tuple(str(n) for n in label_names)
        if len(set(names)) != len(names):
            raise ValueError(f"label_names has duplicates: {names}")
        return _Labels("names", names, path.name, named_ints=True)
    if task_type == "regression":
        for (ln, _, _, v), n in zip(raw, numbers):
            if n is None:
                raise TaskError(f"label {v!r} is not a number; a regression task needs numeric scores", path, ln)
        return _Labels("score", (), path.name)
    scores = [v for (_, _, _, v), n in zip(raw, numbers) if n is not None and not float(n).is_integer()]
    if scores and task_type is None and None in numbers:
        # a score column with a stray word ("nan", "n/a") would otherwise become hundreds of class names
        ln, v = next((ln, v) for (ln, _, _, v), n in zip(raw, numbers) if n is None)
        raise TaskError(f"label {v!r} is not a number, but other labels are scores (e.g. {scores[0]!r})", path, ln)
    if all(n is not None for n in numbers):
        fractional = [(ln, v) for (ln, _, _, v), n in zip(raw, numbers) if not float(n).is_integer()]
        if fractional and task_type == "classification":
            ln, v = fractional[0]
            raise TaskError(
                f"label {v!r} is not an integer class; for scores use task_type='regression' (--task-type "
                "regression)",
                path,
                ln,
            )
        if fractional:
            logger.info("task %s: non-integer numeric labels in %s: a regression task", folder, path.name)
            return _Labels("score", (), path.name)
        values = sorted({int(n) for n in numbers})
        names = tuple(str(v) for v in values)
        if task_type is None and len(values) > MANY_CLASSES:
            logger.warning(
                "task %s: %d integer classes in %s; if the labels are scores, pass task_type='regression' "
                "(--task-type regression)", folder, len(values), path.name,
            )
        if values == list(range(len(values))):
            return _Labels("int", names, path.name)
        shown = ", ".join(f"{v} -> {i}" for i, v in enumerate(values[:6])) + (", ..." if len(values) > 6 else "")
        logger.warning(
            "task %s: the labels of %s are not 0..%d: class ids follow their sorted order (%s); pass "
            "label_names to choose another order", folder, path.name, len(values) - 1, shown,
        )
        return _Labels("mapped", names, path.name)
    # string labels: class names, in sorted order
    return _Labels("names", tuple(sorted({str(v).strip() for _, _, _, v in raw})), path.name)


def _warn_unused_pair_column(columns: Sequence[str], used: Sequence[str], path: Path) -> None:
    """Log a warning when a column named like a second text exists but no pair column was chosen."""
    pair_like = [c for c in columns if c.strip().lower() in PAIR_LIKE_COLUMNS and c not in used]
    if pair_like:
        logger.warning(
            "%s has a column %r that looks like the second text of a pair, but no pair column is set, so only "
            "%r is used; pass --text-pair-column %r (text_pair_column=%r) to use it",
            path, pair_like[0], used[0], pair_like[0], pair_like[0],
        )


def make_user_task(
    folder: str | os.PathLike,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    holdout: float = 0.10,
    task_type: str | None = None,
) -> Task:
    """Build a user task from a folder (see :func:`cahp.data.registry.get_task` for the options).

    The training file is read now, to fix the labels: with ``label_names`` they are those names (or
    their ids); else numeric labels with a non-integer among them make a regression task (unless
    ``task_type="classification"``, an error then); integer labels are class ids, mapped to 0..K-1 in
    sorted order (with a warning) when they are not already 0..K-1; any other labels are names, sorted.
    A blank label, an empty text and a training split with fewer than two classes (or scores) are errors.
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise TaskError(f"unknown task type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise TaskError(f"task folder {folder} does not exist or is not a directory")
    train_path = _find_split_file(folder, ("train",))
    if train_path is None:
        raise TaskError(f"no training file in {folder}: expected train.csv, train.tsv or train.jsonl")
    dev_path = _find_split_file(folder, ("dev", "validation"))
    test_path = _find_split_file(folder, ("test",))
    required = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])

    def read_raw(path: Path) -> _Raw:
        out = []
        rows = read_table(path, required)
        if path == train_path and not text_pair_column:
            _warn_unused_pair_column(list(rows[0][1]), [text_column, label_column], path)
        for ln, r in rows:
            pair = text_field(r, text_pair_column, path, ln) if text_pair_column else None
            v = r[label_column]
            if isinstance(v, (bool, list, dict)):
                raise TaskError(f"label must be a string or a number, got {v!r}", path, ln)
            if isinstance(v, str) and not v.strip():
                raise TaskError(f"blank label in column {label_column!r}", path, ln)
            out.append((ln, text_field(r, text_column, path, ln), pair, v))
        return out

    train_raw = read_raw(train_path)
    labels = _decide_labels(train_raw, train_path, label_names, task_type, folder)
    if labels.task_type == "regression":
        if len({float(v) for _, _, _, v in train_raw}) < 2:
            raise TaskError("every score is the same; regression needs at least two distinct values", train_path)
    elif len(labels.names) < 2:
        raise TaskError(
            f"only one class ({labels.names[0]!r}) in the training split; classification needs at least two",
            train_path,
        )

    def convert(path: Path, raw: _Raw) -> list[Example]:
        return [Example(t, p, labels.convert(v, path, ln)) for ln, t, p, v in raw]

    train_all = Lazy(lambda: convert(train_path, train_raw))
    files: dict[str, Callable[[], list[Example]]] = {}
    if test_path is not None:
        files["test"] = Lazy(lambda: convert(test_path, read_raw(test_path)))
    if dev_path is not None:
        files["train"] = train_all
        files["dev"] = Lazy(lambda: convert(dev_path, read_raw(dev_path)))

        def loader(split: str) -> list[Example]:
            return files[split]()
    else:
        files["full_train"] = train_all
        loader = holdout_loader(files, "full_train", holdout)
        # Check now that a hold-out is possible, so the error appears at get_task time.
        holdout_indices(len(train_raw), holdout)

    if test_path is None:
        logger.warning(
            "task %s: no test file; the dev split doubles as the test split, so reported results are not "
            "held out from model selection",
            folder,
        )
    splits = ("train", "dev", "test") if test_path is not None else ("train", "dev")
    dev_desc = dev_path.name if dev_path else f"a {holdout:.0%} hold-out of {train_path.name}"
    regression = labels.task_type == "regression"
    split_files = {"train": train_path, "dev": dev_path or train_path, "test": test_path or dev_path or train_path}
    return Task(
        name=f"csv:{folder}",
        num_labels=1 if regression else len(labels.names),
        label_names=(label_column,) if regression else labels.names,
        splits=splits,
        train_split="train",
        dev_split="dev",
        test_split="test" if test_path is not None else "dev",
        data_dir=None,
        description=f"user task in {folder}: train {train_path.name}, dev {dev_desc}, "
        f"test {test_path.name if test_path else '(none; dev used)'}",
        is_pair=bool(text_pair_column),
        task_type=labels.task_type,
        split_files={k: v for k, v in split_files.items() if k in splits},
        loader=loader,
    )
