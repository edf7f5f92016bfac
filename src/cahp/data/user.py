"""User tasks: a folder with ``train.{csv,tsv,jsonl}`` and optional ``dev.*`` (or ``validation.*``), ``test.*``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cahp.data.holdout import Lazy, holdout_indices, holdout_loader
from cahp.data.readers import INT_RE, int_label, read_table, text_field
from cahp.data.types import Example, Task, TaskError

logger = logging.getLogger(__name__)

_USER_EXTS = (".csv", ".tsv", ".jsonl")


def _find_split_file(folder: Path, stems: Sequence[str]) -> Path | None:
    found = [folder / f"{s}{ext}" for s in stems for ext in _USER_EXTS if (folder / f"{s}{ext}").is_file()]
    if len(found) > 1:
        raise TaskError(
            f"ambiguous split files in {folder}: {', '.join(p.name for p in found)}; keep only one"
        )
    return found[0] if found else None


def make_user_task(
    folder: str | os.PathLike,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    holdout: float = 0.10,
) -> Task:
    """Build a user task from a folder (see :func:`cahp.data.registry.get_task` for the options)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise TaskError(f"task folder {folder} does not exist or is not a directory")
    train_path = _find_split_file(folder, ("train",))
    if train_path is None:
        raise TaskError(f"no training file in {folder}: expected train.csv, train.tsv or train.jsonl")
    dev_path = _find_split_file(folder, ("dev", "validation"))
    test_path = _find_split_file(folder, ("test",))
    required = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])

    def read_raw(path: Path) -> list[tuple[int, str, str | None, Any]]:
        out = []
        for ln, r in read_table(path, required):
            pair = text_field(r, text_pair_column, path, ln) if text_pair_column else None
            out.append((ln, text_field(r, text_column, path, ln), pair, r[label_column]))
        return out

    train_raw = read_raw(train_path)

    # Decide how labels map to ids, from the training split.
    def is_int_like(v: Any) -> bool:
        return (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, str) and INT_RE.fullmatch(v.strip()) is not None
        )

    for ln, _, _, v in train_raw:
        if isinstance(v, (bool, float, list, dict)):
            raise TaskError(f"label must be a string or an integer, got {v!r}", train_path, ln)

    names: tuple[str, ...]
    if label_names is not None:
        names = tuple(str(n) for n in label_names)
        if len(set(names)) != len(names):
            raise ValueError(f"label_names has duplicates: {names}")
        mode = "names"
    elif all(is_int_like(v) for _, _, _, v in train_raw):
        ints = [(ln, int(v) if isinstance(v, int) else int(v.strip())) for ln, _, _, v in train_raw]
        for ln, v in ints:
            if v < 0:
                raise TaskError(f"negative label {v}", train_path, ln)
        names = tuple(str(i) for i in range(max(v for _, v in ints) + 1))
        mode = "int"
    else:
        names = tuple(sorted({str(v).strip() for _, _, _, v in train_raw}))
        mode = "names"
    if len(names) < 2:
        logger.warning("task %s: only %d class(es) in %s", folder, len(names), train_path)

    def to_label(v: Any, path: Path, ln: int) -> int:
        if mode == "int":
            return int_label(v, len(names), path, ln)
        if isinstance(v, (bool, float, list, dict)):
            raise TaskError(f"label must be a string or an integer, got {v!r}", path, ln)
        s = str(v).strip()
        if s in names:
            return names.index(s)
        if label_names is not None and is_int_like(v) and 0 <= int(s) < len(names):
            return int(s)
        raise TaskError(
            f"unknown label {v!r} (labels of the training split {train_path.name}: {', '.join(names)})",
            path,
            ln,
        )

    def convert(path: Path, raw: list[tuple[int, str, str | None, Any]]) -> list[Example]:
        return [Example(t, p, to_label(v, path, ln)) for ln, t, p, v in raw]

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
    return Task(
        name=f"csv:{folder}",
        num_labels=len(names),
        label_names=names,
        splits=splits,
        train_split="train",
        dev_split="dev",
        test_split="test" if test_path is not None else "dev",
        data_dir=None,
        description=f"user task in {folder}: train {train_path.name}, dev {dev_desc}, "
        f"test {test_path.name if test_path else '(none; dev used)'}",
        is_pair=text_pair_column is not None,
        loader=loader,
    )
