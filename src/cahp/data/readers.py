"""Line-numbered readers of headed TSV (quoting off), CSV (standard quoting) and JSON Lines files.

Every problem raises :class:`~cahp.data.types.TaskError` naming the file and the 1-based line.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cahp.data.types import TaskError

INT_RE = re.compile(r"[+-]?\d+")
#: A decimal number as written in data files: ``3``, ``-0.5``, ``3.800``, ``.5``, ``1e-3``.
FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line without newline)``; decoding errors name the line."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise TaskError("file not found", path) from None
    except OSError as e:
        raise TaskError(f"cannot read file: {e}", path) from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskError(f"not valid UTF-8: {e}", path, lineno) from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield lineno, line.rstrip("\r\n")


def read_tsv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Read a headed TSV with quoting off. Returns ``(line number, row)`` pairs."""
    lines = iter_lines(path)
    first = next(lines, None)
    if first is None or not first[1].strip():
        raise TaskError("empty file (expected a header line)", path, 1 if first is not None else None)
    header = first[1].split("\t")
    check_columns(path, header, required)
    rows: list[tuple[int, dict[str, str]]] = []
    ncol = len(header)
    for lineno, line in lines:
        if not line.strip():
            raise TaskError("blank line", path, lineno)
        fields = line.split("\t")
        if len(fields) != ncol:
            raise TaskError(
                f"expected {ncol} tab-separated columns ({', '.join(header)}), found {len(fields)}",
                path,
                lineno,
            )
        rows.append((lineno, dict(zip(header, fields))))
    if not rows:
        raise TaskError("empty file (a header but no data lines)", path)
    return rows


def read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Read a headed CSV (standard quoting). Line numbers are those where each record starts."""
    try:
        f = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise TaskError("file not found", path) from None
    rows: list[tuple[int, dict[str, str]]] = []
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise TaskError(
                    "empty file (expected a header line)", path, 1 if header is not None else None
                )
            check_columns(path, header, required)
            ncol = len(header)
            start = reader.line_num + 1
            for fields in reader:
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    raise TaskError("blank line", path, start)
                if len(fields) != ncol:
                    raise TaskError(
                        f"expected {ncol} comma-separated columns ({', '.join(header)}), found {len(fields)}",
                        path,
                        start,
                    )
                rows.append((start, dict(zip(header, fields))))
                start = reader.line_num + 1
        except csv.Error as e:
            raise TaskError(f"malformed CSV: {e}", path, reader.line_num) from None
        except UnicodeDecodeError as e:
            raise TaskError(f"not valid UTF-8: {e}", path) from None
    if not rows:
        raise TaskError("empty file (a header but no data lines)", path)
    return rows


def read_jsonl(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """Read JSON Lines: one object per line, each with the ``required`` fields."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in iter_lines(path):
        if not line.strip():
            raise TaskError("blank line", path, lineno)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"bad JSON: {e.msg} (column {e.colno})", path, lineno) from None
        if not isinstance(obj, dict):
            raise TaskError(f"expected a JSON object, got {type(obj).__name__}", path, lineno)
        for key in required:
            if key not in obj or obj[key] is None:
                raise TaskError(f"missing field {key!r}", path, lineno)
        rows.append((lineno, obj))
    if not rows:
        raise TaskError("empty file", path)
    return rows


def check_columns(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
    """Raise TaskError (line 1) for missing ``required`` or duplicated column names in ``header``."""
    missing = [c for c in required if c not in header]
    if missing:
        raise TaskError(
            f"missing column(s) {', '.join(map(repr, missing))} in the header; columns are: "
            f"{', '.join(map(repr, header))}",
            path,
            1,
        )
    dupes = {h for h in header if header.count(h) > 1}
    if dupes:
        raise TaskError(f"duplicate column name(s) in the header: {', '.join(sorted(dupes))}", path, 1)


def read_table(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """Read a ``.tsv``, ``.csv`` or ``.jsonl`` file into ``(line number, row)`` pairs by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return read_tsv(path, required)
    if suffix == ".csv":
        return read_csv(path, required)
    if suffix == ".jsonl":
        return read_jsonl(path, required)
    raise TaskError(f"unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)", path)


def text_field(row: dict[str, Any], key: str, path: Path, lineno: int) -> str:
    """The stripped string ``row[key]``; TaskError when it is missing, not a string or empty."""
    value = row.get(key)
    if value is None:
        raise TaskError(f"missing field {key!r}", path, lineno)
    if not isinstance(value, str):
        raise TaskError(f"field {key!r} must be a string, got {type(value).__name__}", path, lineno)
    value = value.strip()
    if not value:
        raise TaskError(f"empty text in field {key!r}", path, lineno)
    return value


def int_label(value: Any, num_labels: int, path: Path, lineno: int) -> int:
    """Parse an integer label (JSON int or decimal string) and check ``0 <= label < num_labels``."""
    if isinstance(value, bool):
        raise TaskError(f"label must be an integer, got {value!r}", path, lineno)
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and INT_RE.fullmatch(value.strip()):
        label = int(value.strip())
    else:
        raise TaskError(f"label must be an integer, got {value!r}", path, lineno)
    if not 0 <= label < num_labels:
        raise TaskError(f"label {label} out of range 0..{num_labels - 1}", path, lineno)
    return label


def named_label(value: Any, names: Sequence[str], path: Path, lineno: int) -> int:
    """Map a string label (one of ``names``) to its index."""
    if isinstance(value, str):
        v = value.strip()
        if v in names:
            return names.index(v)
    raise TaskError(f"unknown label {value!r}; expected one of {', '.join(names)}", path, lineno)



def parse_number(value: Any) -> int | float | None:
    """``value`` as a number: a JSON int/float or a decimal string (ints stay ints); ``None`` otherwise.

    Booleans, NaN and infinities are not numbers here (a label of ``true`` or ``nan`` is a data error).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        v = value.strip()
        if INT_RE.fullmatch(v):
            return int(v)
        if FLOAT_RE.fullmatch(v):
            return float(v)
    return None


def float_label(value: Any, path: Path, lineno: int, low: float | None = None, high: float | None = None) -> float:
    """Parse a regression score (a number, see :func:`parse_number`), optionally checked against ``[low, high]``."""
    number = parse_number(value)
    if number is None:
        raise TaskError(f"score must be a finite number, got {value!r}", path, lineno)
    number = float(number)
    if (low is not None and number < low) or (high is not None and number > high):
        raise TaskError(f"score {number} out of range {low}..{high}", path, lineno)
    return number
