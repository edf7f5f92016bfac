"""Task registry: loads the benchmark data sets and user data as lists of :class:`Example`.

Built-in tasks (see :func:`available_tasks`):

* ``sst5``: Stanford Sentiment Treebank, five classes, from ``<data>/sst5/{train,dev,test}.txt``
  (PTB trees, one per line; the root label is the sentence label).
* ``sst2``: binary SST. From ``<data>/glue/SST-2`` when present (``train.tsv`` minus a 5 % hold-out is
  ``train``, the hold-out is ``dev``, the official GLUE ``dev.tsv`` is ``test``); otherwise derived from the
  SST-5 trees (label 2 dropped, 0-1 -> 0, 3-4 -> 1) with the trees' own train/dev/test.
* ``rte``: GLUE RTE sentence pairs. ``train.tsv`` minus a 10 % hold-out is ``train``, the hold-out is
  ``dev``, the official ``dev.tsv`` is ``test``.
* ``mnli``: the official MultiNLI splits (GLUE TSV or JSONL layout). ``dev`` is a 2 % hold-out of train,
  ``validation_matched`` is the test split and ``validation_mismatched`` an extra evaluation split.
* ``mnli-small``: the reduced protocol on ``<data>/mnli/dev_matched.jsonl`` split by ``idx % 5``.

User tasks: ``get_task("csv:/path/to/folder")`` or ``get_task("/path/to/folder")`` for a folder holding
``train.{csv,tsv,jsonl}`` and optionally ``dev.*`` (or ``validation.*``) and ``test.*``.

Conventions:

* Every data problem raises :class:`TaskError` naming the file and the 1-based line number where there is
  one. No line is ever skipped silently; blank lines are errors too. (The only deliberate omission is SST-2
  derived from the trees, which drops the neutral sentences by definition.)
* TSV files are read with quoting off (plain split on tab), as the GLUE files require. CSV files are read
  with the standard ``csv`` dialect (double-quote quoting). Text fields are stripped of surrounding
  whitespace.
* SST trees: the sentence is the leaves joined by single spaces, with the PTB escapes ``-LRB-``/``-RRB-``
  (and ``-LSB-``, ``-RSB-``, ``-LCB-``, ``-RCB-``) turned back into brackets and ``\\/``, ``\\*`` into
  ``/``, ``*``. The quote tokens `````` and ``''`` are kept as they are, which matches the text of the GLUE
  SST-2 files.
* Hold-out splits are deterministic: the ``round(fraction * n)`` rows (at least 1) whose SHA-256 hash of
  ``"cahp-holdout:<i>"`` is smallest are held out, where ``i`` is the 0-based row index in the file (header
  excluded). Both parts keep the file order. The choice does not depend on Python's ``hash()``, the
  platform or the process.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "Example",
    "Task",
    "TaskError",
    "available_tasks",
    "get_task",
    "resolve_data_dir",
    "holdout_indices",
]

DATA_DIR_ENV = "CAHP_DATA_DIR"
_DATA_DIR_HELP = f"set the data directory with --data-dir or the {DATA_DIR_ENV} environment variable"
_HOLDOUT_SALT = "cahp-holdout"

SST5_LABEL_NAMES = ("very negative", "negative", "neutral", "positive", "very positive")
SST2_LABEL_NAMES = ("negative", "positive")
RTE_LABEL_NAMES = ("entailment", "not_entailment")
NLI_LABEL_NAMES = ("entailment", "neutral", "contradiction")


# --------------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled example.

    Attributes:
        text: The (first) text.
        text_pair: The second text of a sentence-pair task, else ``None``.
        label: The class id, ``0 <= label < task.num_labels``.
    """

    text: str
    text_pair: str | None
    label: int


class TaskError(ValueError):
    """A problem with a task's data: a missing file, a malformed line, a bad label, an empty file.

    Args:
        message: What is wrong.
        path: The file concerned, if any; it is prefixed to the message.
        line: The 1-based line number in ``path``, if any; it is prefixed to the message.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.path = Path(path) if path is not None else None
        self.line = line
        self.reason = message
        prefix = ""
        if path is not None:
            prefix = f"{path}, line {line}: " if line is not None else f"{path}: "
        super().__init__(prefix + message)


@dataclass
class Task:
    """A classification task with named splits.

    Attributes:
        name: Registry name (``"sst5"``, ...) or ``"csv:<folder>"`` for user tasks.
        num_labels: Number of classes.
        label_names: One name per class id.
        splits: All split names :meth:`load` accepts.
        train_split: The split to train on.
        dev_split: The split for early stopping / model selection.
        test_split: The split for final reporting (never used for selection).
        extra_eval_splits: Further evaluation-only splits (e.g. MNLI mismatched).
        is_pair: Whether examples are sentence pairs (``text_pair`` set).
        data_dir: The data directory the task reads from (``None`` for user tasks).
        description: One line saying where the data comes from.
        loader: ``loader(split) -> list[Example]``; called at most once per split.
    """

    name: str
    num_labels: int
    label_names: tuple[str, ...]
    splits: tuple[str, ...]
    train_split: str
    dev_split: str
    test_split: str
    extra_eval_splits: tuple[str, ...] = ()
    is_pair: bool = False
    data_dir: Path | None = None
    description: str = ""
    loader: Callable[[str], list[Example]] | None = field(default=None, repr=False, compare=False)
    _cache: dict[str, list[Example]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def load(self, split: str) -> list[Example]:
        """Load one split.

        Args:
            split: One of :attr:`splits`.

        Returns:
            The split's examples in file order (a new list each call; the parsed data is cached).

        Raises:
            TaskError: For an unknown split name or any problem with the data.
        """
        if split not in self.splits:
            raise TaskError(
                f"task {self.name!r} has no split {split!r}; valid splits: {', '.join(self.splits)}"
            )
        if split not in self._cache:
            if self.loader is None:
                raise TaskError(f"task {self.name!r} has no loader")
            examples = self.loader(split)
            if not examples:
                raise TaskError(f"task {self.name!r}: split {split!r} is empty")
            for ex in examples:
                if not 0 <= ex.label < self.num_labels:  # defensive; readers already check
                    raise TaskError(f"task {self.name!r}: label {ex.label} out of range in split {split!r}")
            self._cache[split] = examples
            logger.info("task %s: loaded %d examples for split %r", self.name, len(examples), split)
        return list(self._cache[split])


# --------------------------------------------------------------------------------------------------
# Data directory
# --------------------------------------------------------------------------------------------------


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def _resolve_data_dir_with_source(data_dir: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "--data-dir"
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser(), f"the {DATA_DIR_ENV} environment variable"
    for base, what in ((Path.cwd(), "the current directory"), (_repo_root(), "the repository root")):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate, f"the default ../shared/data next to {what}"
    return None, "nothing"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Find the data directory.

    Order: the explicit ``data_dir`` (``--data-dir``), then the ``CAHP_DATA_DIR`` environment variable,
    then ``../shared/data`` next to the current working directory, then ``../shared/data`` next to the
    repository root. Explicit and environment values are returned even if they do not exist (the task
    then reports the missing file); the defaults only if they exist.

    Args:
        data_dir: An explicit directory, or ``None``.

    Returns:
        The directory, or ``None`` when none was given and no default exists.
    """
    return _resolve_data_dir_with_source(data_dir)[0]


class _DataRoot:
    """A resolved data directory that remembers how it was chosen, for error messages."""

    def __init__(self, data_dir: str | os.PathLike | None):
        self.path, self.source = _resolve_data_dir_with_source(data_dir)

    def require(self) -> Path:
        if self.path is None:
            raise TaskError(
                "no data directory found: none was given and no ../shared/data exists next to the current "
                f"directory or the repository root; {_DATA_DIR_HELP}"
            )
        if not self.path.is_dir():
            raise TaskError(
                f"data directory {self.path} (set by {self.source}) does not exist or is not a directory; "
                f"{_DATA_DIR_HELP}"
            )
        return self.path

    def missing(self, *paths: Path, what: str = "data file") -> TaskError:
        looked = " or ".join(str(p) for p in paths)
        return TaskError(
            f"{what} not found: {looked} (data directory {self.path}, set by {self.source}); {_DATA_DIR_HELP}"
        )


# --------------------------------------------------------------------------------------------------
# Low-level readers
# --------------------------------------------------------------------------------------------------


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
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


def _read_tsv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Read a headed TSV with quoting off. Returns ``(line number, row)`` pairs."""
    lines = _iter_lines(path)
    first = next(lines, None)
    if first is None or not first[1].strip():
        raise TaskError("empty file (expected a header line)", path, 1 if first is not None else None)
    header = first[1].split("\t")
    _check_columns(path, header, required)
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


def _read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
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
            _check_columns(path, header, required)
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


def _read_jsonl(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """Read JSON Lines: one object per line, each with the ``required`` fields."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in _iter_lines(path):
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


def _check_columns(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
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


def _read_table(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return _read_tsv(path, required)
    if suffix == ".csv":
        return _read_csv(path, required)
    if suffix == ".jsonl":
        return _read_jsonl(path, required)
    raise TaskError(f"unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)", path)


def _text_field(row: dict[str, Any], key: str, path: Path, lineno: int) -> str:
    value = row.get(key)
    if value is None:
        raise TaskError(f"missing field {key!r}", path, lineno)
    if not isinstance(value, str):
        raise TaskError(f"field {key!r} must be a string, got {type(value).__name__}", path, lineno)
    return value.strip()


def _int_label(value: Any, num_labels: int, path: Path, lineno: int) -> int:
    """Parse an integer label (JSON int or decimal string) and check ``0 <= label < num_labels``."""
    if isinstance(value, bool):
        raise TaskError(f"label must be an integer, got {value!r}", path, lineno)
    if isinstance(value, int):
        label = value
    elif isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        label = int(value.strip())
    else:
        raise TaskError(f"label must be an integer, got {value!r}", path, lineno)
    if not 0 <= label < num_labels:
        raise TaskError(f"label {label} out of range 0..{num_labels - 1}", path, lineno)
    return label


def _named_label(value: Any, names: Sequence[str], path: Path, lineno: int) -> int:
    """Map a string label (one of ``names``) to its index."""
    if isinstance(value, str):
        v = value.strip()
        if v in names:
            return names.index(v)
    raise TaskError(f"unknown label {value!r}; expected one of {', '.join(names)}", path, lineno)


_INT_RE = re.compile(r"[+-]?\d+")


# --------------------------------------------------------------------------------------------------
# PTB trees (SST)
# --------------------------------------------------------------------------------------------------

_TREE_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_SST_NODE_LABELS = frozenset("01234")
_PTB_UNESCAPE = {
    "-LRB-": "(",
    "-RRB-": ")",
    "-LSB-": "[",
    "-RSB-": "]",
    "-LCB-": "{",
    "-RCB-": "}",
}


def _unescape_ptb(token: str) -> str:
    token = _PTB_UNESCAPE.get(token, token)
    if "\\" in token:
        token = token.replace("\\/", "/").replace("\\*", "*")
    return token


def parse_sst_tree(line: str) -> tuple[int, str]:
    """Parse one SST PTB tree such as ``(3 (2 It) (4 (4 rocks) (2 .)))``.

    Every node label must be 0..4. Leaves are unescaped (see the module docstring) and joined by spaces.

    Args:
        line: One tree.

    Returns:
        ``(root label, sentence)``.

    Raises:
        ValueError: When the tree is malformed (the caller adds file and line).
    """
    tokens = _TREE_TOKEN.findall(line)
    if not tokens:
        raise ValueError("empty tree")
    if tokens[0] != "(":
        raise ValueError(f"a tree must start with '(', found {tokens[0]!r}")
    children: list[int] = []  # number of children of each open node
    expect_label = False
    root_label: int | None = None
    leaves: list[str] = []
    for pos, tok in enumerate(tokens):
        if pos > 0 and not children:
            raise ValueError(f"unexpected text after the end of the tree: {tok!r}")
        if tok == "(":
            if expect_label:
                raise ValueError("missing node label after '('")
            if children:
                children[-1] += 1
            children.append(0)
            expect_label = True
        elif tok == ")":
            if expect_label:
                raise ValueError("empty node '()'")
            if children[-1] == 0:
                raise ValueError("node without children")
            children.pop()
        elif expect_label:
            if tok not in _SST_NODE_LABELS:
                raise ValueError(f"invalid node label {tok!r} (expected 0..4)")
            if root_label is None:
                root_label = int(tok)
            expect_label = False
        else:
            leaves.append(_unescape_ptb(tok))
            children[-1] += 1
    if children:
        raise ValueError(f"unbalanced parentheses: {len(children)} node(s) not closed")
    if not leaves or root_label is None:
        raise ValueError("tree without words")
    return root_label, " ".join(leaves)


def _read_sst_trees(path: Path) -> list[tuple[int, int, str]]:
    """Read an SST tree file into ``(line number, root label, sentence)`` triples."""
    out: list[tuple[int, int, str]] = []
    for lineno, line in _iter_lines(path):
        if not line.strip():
            raise TaskError("blank line (expected a tree)", path, lineno)
        try:
            label, text = parse_sst_tree(line)
        except ValueError as e:
            raise TaskError(f"unparseable tree: {e}", path, lineno) from None
        out.append((lineno, label, text))
    if not out:
        raise TaskError("empty file", path)
    return out


# --------------------------------------------------------------------------------------------------
# Hold-out
# --------------------------------------------------------------------------------------------------


def _stable_hash(i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{_HOLDOUT_SALT}:{i}".encode()).digest()[:8], "big")


def holdout_indices(n: int, fraction: float) -> frozenset[int]:
    """Choose a deterministic hold-out of row indices ``0..n-1``.

    The ``max(1, round(fraction * n))`` indices with the smallest SHA-256 hash of ``"cahp-holdout:<i>"``
    are chosen, so the choice is identical on every machine and run.

    Args:
        n: Number of rows.
        fraction: Share to hold out, ``0 < fraction < 1``.

    Returns:
        The held-out indices.

    Raises:
        TaskError: If ``n < 2`` (nothing would be left to train on).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise TaskError(f"cannot hold out a dev split from {n} example(s)")
    k = min(n - 1, max(1, round(fraction * n)))
    ranked = sorted(range(n), key=lambda i: (_stable_hash(i), i))
    return frozenset(ranked[:k])


def _split_holdout(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    held = holdout_indices(len(examples), fraction)
    train = [ex for i, ex in enumerate(examples) if i not in held]
    dev = [ex for i, ex in enumerate(examples) if i in held]
    return train, dev


class _Lazy:
    """Compute a value once, on first use."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn = fn
        self._done = False
        self._value: Any = None

    def __call__(self) -> Any:
        if not self._done:
            self._value = self._fn()
            self._done = True
        return self._value


def _holdout_loader(
    files: dict[str, Callable[[], list[Example]]], source: str, fraction: float
) -> Callable[[str], list[Example]]:
    """A loader whose ``train``/``dev`` come from a hold-out of ``files[source]``; other splits read as-is."""
    parts = _Lazy(lambda: _split_holdout(files[source](), fraction))

    def load(split: str) -> list[Example]:
        if split == "train":
            return parts()[0]
        if split == "dev":
            return parts()[1]
        return files[split]()

    return load


# --------------------------------------------------------------------------------------------------
# Built-in tasks
# --------------------------------------------------------------------------------------------------


def _no_kwargs(name: str, kwargs: dict[str, Any], allowed: Sequence[str] = ()) -> None:
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise TypeError(f"task {name!r} takes no option(s) {', '.join(extra)}")


def _sst_tree_files(root: _DataRoot) -> dict[str, Path]:
    base = root.require() / "sst5"
    return {split: base / f"{split}.txt" for split in ("train", "dev", "test")}


def _make_sst5(root: _DataRoot, **kwargs: Any) -> Task:
    _no_kwargs("sst5", kwargs)
    files = _sst_tree_files(root)
    for path in files.values():
        if not path.is_file():
            raise root.missing(path, what="SST-5 tree file")

    def load(split: str) -> list[Example]:
        return [Example(text, None, label) for _, label, text in _read_sst_trees(files[split])]

    return Task(
        name="sst5",
        num_labels=5,
        label_names=SST5_LABEL_NAMES,
        splits=("train", "dev", "test"),
        train_split="train",
        dev_split="dev",
        test_split="test",
        data_dir=root.path,
        description=f"SST-5 PTB trees in {files['train'].parent}",
        loader=load,
    )


def _sst2_from_tsv(path: Path) -> list[Example]:
    rows = _read_tsv(path, ("sentence", "label"))
    return [
        Example(_text_field(r, "sentence", path, ln), None, _int_label(r["label"], 2, path, ln))
        for ln, r in rows
    ]


def _make_sst2(root: _DataRoot, holdout: float = 0.05, **kwargs: Any) -> Task:
    _no_kwargs("sst2", kwargs)
    data = root.require()
    glue = data / "glue" / "SST-2"
    common = dict(
        name="sst2",
        num_labels=2,
        label_names=SST2_LABEL_NAMES,
        splits=("train", "dev", "test"),
        train_split="train",
        dev_split="dev",
        test_split="test",
        data_dir=root.path,
    )
    if (glue / "train.tsv").is_file():
        for p in (glue / "train.tsv", glue / "dev.tsv"):
            if not p.is_file():
                raise root.missing(p, what="GLUE SST-2 file")
        files = {
            "full_train": _Lazy(lambda: _sst2_from_tsv(glue / "train.tsv")),
            "test": _Lazy(lambda: _sst2_from_tsv(glue / "dev.tsv")),
        }
        return Task(
            **common,
            description=f"GLUE SST-2 in {glue}: train.tsv minus a {holdout:.0%} hold-out (dev); "
            "the GLUE dev.tsv is test",
            loader=_holdout_loader(files, "full_train", holdout),
        )
    trees = _sst_tree_files(root)
    if all(p.is_file() for p in trees.values()):
        logger.info("sst2: %s not found, deriving SST-2 from the SST-5 trees", glue)

        def load(split: str) -> list[Example]:
            return [
                Example(text, None, 0 if label < 2 else 1)
                for _, label, text in _read_sst_trees(trees[split])
                if label != 2
            ]

        return Task(
            **common,
            description=f"SST-2 derived from the SST-5 trees in {trees['train'].parent} "
            "(label 2 dropped, 0-1 -> 0, 3-4 -> 1)",
            loader=load,
        )
    raise root.missing(glue / "train.tsv", trees["train"], what="SST-2 data (GLUE TSV or SST-5 trees)")


def _rte_from_tsv(path: Path) -> list[Example]:
    rows = _read_tsv(path, ("sentence1", "sentence2", "label"))
    return [
        Example(
            _text_field(r, "sentence1", path, ln),
            _text_field(r, "sentence2", path, ln),
            _named_label(r["label"], RTE_LABEL_NAMES, path, ln),
        )
        for ln, r in rows
    ]


def _make_rte(root: _DataRoot, holdout: float = 0.10, **kwargs: Any) -> Task:
    _no_kwargs("rte", kwargs)
    glue = root.require() / "glue" / "RTE"
    for p in (glue / "train.tsv", glue / "dev.tsv"):
        if not p.is_file():
            raise root.missing(p, what="GLUE RTE file")
    files = {
        "full_train": _Lazy(lambda: _rte_from_tsv(glue / "train.tsv")),
        "test": _Lazy(lambda: _rte_from_tsv(glue / "dev.tsv")),
    }
    return Task(
        name="rte",
        is_pair=True,
        num_labels=2,
        label_names=RTE_LABEL_NAMES,
        splits=("train", "dev", "test"),
        train_split="train",
        dev_split="dev",
        test_split="test",
        data_dir=root.path,
        description=f"GLUE RTE in {glue}: train.tsv minus a {holdout:.0%} hold-out (dev); "
        "the GLUE dev.tsv is test",
        loader=_holdout_loader(files, "full_train", holdout),
    )


def _nli_label(value: Any, path: Path, lineno: int) -> int:
    """An NLI label: an int 0..2 or one of the names ``entailment``/``neutral``/``contradiction``."""
    if isinstance(value, str) and not _INT_RE.fullmatch(value.strip()):
        return _named_label(value, NLI_LABEL_NAMES, path, lineno)
    return _int_label(value, 3, path, lineno)


def _nli_from_file(path: Path) -> list[Example]:
    if path.suffix == ".tsv":  # GLUE MNLI layout: sentence1, sentence2, gold_label
        rows = _read_tsv(path, ("sentence1", "sentence2", "gold_label"))
        keys = ("sentence1", "sentence2", "gold_label")
    else:
        rows = _read_jsonl(path, ("premise", "hypothesis", "label"))
        keys = ("premise", "hypothesis", "label")
    return [
        Example(
            _text_field(r, keys[0], path, ln),
            _text_field(r, keys[1], path, ln),
            _nli_label(r[keys[2]], path, ln),
        )
        for ln, r in rows
    ]


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _hub_mnli_loader(holdout: float) -> Callable[[str], list[Example]]:
    """Load MNLI from the Hugging Face Hub (``nyu-mll/glue``, ``mnli``); failures become TaskError."""

    def fetch(split: str) -> list[Example]:
        try:
            import datasets  # type: ignore[import-not-found]

            ds = datasets.load_dataset("nyu-mll/glue", "mnli", split=split)
            out = []
            for i, row in enumerate(ds):
                label = int(row["label"])
                if not 0 <= label < 3:
                    raise TaskError(f"Hub MNLI split {split!r} row {i}: label {label} out of range 0..2")
                out.append(Example(str(row["premise"]).strip(), str(row["hypothesis"]).strip(), label))
            return out
        except TaskError:
            raise
        except Exception as e:  # network, missing package, Hub errors, ...
            raise TaskError(
                f"MNLI's training split is missing locally and fetching it from the Hugging Face Hub "
                f"(nyu-mll/glue, mnli, split {split!r}) failed: {type(e).__name__}: {e}. Put the MNLI "
                f"files in the data directory ({_DATA_DIR_HELP}) or use the task 'mnli-small'"
            ) from e

    files = {
        "full_train": _Lazy(lambda: fetch("train")),
        "validation_matched": _Lazy(lambda: fetch("validation_matched")),
        "validation_mismatched": _Lazy(lambda: fetch("validation_mismatched")),
    }
    return _holdout_loader(files, "full_train", holdout)


def _hub_allowed(allow_hub: bool) -> bool:
    if not allow_hub:
        return False
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        import importlib.util

        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def _make_mnli(root: _DataRoot, holdout: float = 0.02, allow_hub: bool = True, **kwargs: Any) -> Task:
    _no_kwargs("mnli", kwargs)
    common = dict(
        name="mnli",
        is_pair=True,
        num_labels=3,
        label_names=NLI_LABEL_NAMES,
        splits=("train", "dev", "validation_matched", "validation_mismatched"),
        train_split="train",
        dev_split="dev",
        test_split="validation_matched",
        extra_eval_splits=("validation_mismatched",),
        data_dir=root.path,
    )
    train_candidates: list[Path] = []
    if root.path is not None and root.path.is_dir():
        tsv, jl = root.path / "MNLI", root.path / "mnli"
        layouts = [
            (tsv / "train.tsv", (tsv / "dev_matched.tsv",), (tsv / "dev_mismatched.tsv",)),
            (
                jl / "train.jsonl",
                (jl / "validation_matched.jsonl", jl / "dev_matched.jsonl"),
                (jl / "validation_mismatched.jsonl", jl / "dev_mismatched.jsonl"),
            ),
        ]
        for train, matched, mismatched in layouts:
            train_candidates.append(train)
            if not train.is_file():
                continue
            m = _first_existing(*matched)
            mm = _first_existing(*mismatched)
            if m is None:
                raise root.missing(*matched, what="MNLI validation_matched file")
            if mm is None:
                raise root.missing(*mismatched, what="MNLI validation_mismatched file")
            files = {
                "full_train": _Lazy(lambda train=train: _nli_from_file(train)),
                "validation_matched": _Lazy(lambda m=m: _nli_from_file(m)),
                "validation_mismatched": _Lazy(lambda mm=mm: _nli_from_file(mm)),
            }
            return Task(
                **common,
                description=f"MNLI from {train.parent}: train minus a {holdout:.0%} hold-out (dev); "
                "validation_matched is test",
                loader=_holdout_loader(files, "full_train", holdout),
            )
    if _hub_allowed(allow_hub):
        logger.warning(
            "mnli: no local training split, will fetch nyu-mll/glue (mnli) from the Hugging Face Hub"
        )
        return Task(
            **common,
            description="MNLI from the Hugging Face Hub (nyu-mll/glue, mnli)",
            loader=_hub_mnli_loader(holdout),
        )
    looked = (
        " or ".join(str(p) for p in train_candidates) or "<data>/MNLI/train.tsv or <data>/mnli/train.jsonl"
    )
    raise TaskError(
        f"MNLI's training split is missing (looked for {looked}; data directory {root.path}, set by "
        f"{root.source}). Use the task 'mnli-small' (the reduced protocol on dev_matched.jsonl), or provide "
        f"the official MNLI files ({_DATA_DIR_HELP})"
    )


def _make_mnli_small(root: _DataRoot, **kwargs: Any) -> Task:
    _no_kwargs("mnli-small", kwargs)
    path = root.require() / "mnli" / "dev_matched.jsonl"
    if not path.is_file():
        raise root.missing(path, what="MNLI dev_matched file")

    def read() -> dict[str, list[Example]]:
        parts: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
        for ln, r in _read_jsonl(path, ("idx", "premise", "hypothesis", "label")):
            idx = r["idx"]
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise TaskError(f"field 'idx' must be a non-negative integer, got {idx!r}", path, ln)
            ex = Example(
                _text_field(r, "premise", path, ln),
                _text_field(r, "hypothesis", path, ln),
                _nli_label(r["label"], path, ln),
            )
            parts["test" if idx % 5 == 0 else "dev" if idx % 5 == 1 else "train"].append(ex)
        return parts

    parts = _Lazy(read)
    return Task(
        name="mnli-small",
        is_pair=True,
        num_labels=3,
        label_names=NLI_LABEL_NAMES,
        splits=("train", "dev", "test"),
        train_split="train",
        dev_split="dev",
        test_split="test",
        data_dir=root.path,
        description=f"reduced MNLI protocol on {path}: test idx%5==0, dev idx%5==1, train the rest "
        "(not comparable to MNLI results)",
        loader=lambda split: parts()[split],
    )


_REGISTRY: dict[str, Callable[..., Task]] = {
    "sst5": _make_sst5,
    "sst2": _make_sst2,
    "rte": _make_rte,
    "mnli": _make_mnli,
    "mnli-small": _make_mnli_small,
}
_ALIASES = {"sst-5": "sst5", "sst-2": "sst2", "mnli_small": "mnli-small", "mnlismall": "mnli-small"}


# --------------------------------------------------------------------------------------------------
# User tasks
# --------------------------------------------------------------------------------------------------

_USER_EXTS = (".csv", ".tsv", ".jsonl")


def _find_split_file(folder: Path, stems: Sequence[str]) -> Path | None:
    found = [folder / f"{s}{ext}" for s in stems for ext in _USER_EXTS if (folder / f"{s}{ext}").is_file()]
    if len(found) > 1:
        raise TaskError(
            f"ambiguous split files in {folder}: {', '.join(p.name for p in found)}; keep only one"
        )
    return found[0] if found else None


def _make_user_task(
    folder: str | os.PathLike,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    holdout: float = 0.10,
) -> Task:
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
        for ln, r in _read_table(path, required):
            pair = _text_field(r, text_pair_column, path, ln) if text_pair_column else None
            out.append((ln, _text_field(r, text_column, path, ln), pair, r[label_column]))
        return out

    train_raw = read_raw(train_path)

    # Decide how labels map to ids, from the training split.
    def is_int_like(v: Any) -> bool:
        return (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, str) and _INT_RE.fullmatch(v.strip()) is not None
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
            return _int_label(v, len(names), path, ln)
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

    train_all = _Lazy(lambda: convert(train_path, train_raw))
    files: dict[str, Callable[[], list[Example]]] = {}
    if test_path is not None:
        files["test"] = _Lazy(lambda: convert(test_path, read_raw(test_path)))
    if dev_path is not None:
        files["train"] = train_all
        files["dev"] = _Lazy(lambda: convert(dev_path, read_raw(dev_path)))

        def loader(split: str) -> list[Example]:
            return files[split]()
    else:
        files["full_train"] = train_all
        loader = _holdout_loader(files, "full_train", holdout)
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


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def available_tasks() -> list[str]:
    """Names of the built-in tasks (user tasks are given as ``"csv:<folder>"`` or a folder path).

    Returns:
        Sorted task names.
    """
    return sorted(_REGISTRY)


def get_task(name: str, data_dir: str | os.PathLike | None = None, **kwargs: Any) -> Task:
    """Build a task by name.

    Args:
        name: A built-in task (:func:`available_tasks`; ``sst-5``/``sst-2`` are accepted too), or
            ``"csv:<folder>"``, or the path of an existing folder, for a user task.
        data_dir: The data directory for built-in tasks; see :func:`resolve_data_dir`.
        **kwargs: Task options. User tasks: ``text_column="text"``, ``text_pair_column=None``,
            ``label_column="label"``, ``label_names=None`` (fixes the label order), ``holdout=0.1``.
            ``sst2``/``rte``/``mnli``: ``holdout`` (0.05/0.10/0.02). ``mnli``: ``allow_hub=True``.

    Returns:
        The task. Files are checked for existence now and parsed on first :meth:`Task.load`
        (user tasks read their training file now, to fix the labels).

    Raises:
        TaskError: Unknown task or missing/malformed data.
        TypeError: An option the task does not take.
    """
    raw = str(name).strip()
    if raw.lower().startswith("csv:"):
        return _make_user_task(raw[4:], **kwargs)
    key = raw.lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key](_DataRoot(data_dir), **kwargs)
    if raw and Path(raw).expanduser().is_dir():
        return _make_user_task(raw, **kwargs)
    raise TaskError(
        f"unknown task {name!r}; available: {', '.join(available_tasks())}, or 'csv:<folder>' for a folder "
        "with train.{csv,tsv,jsonl} (and optional dev.*, test.*)"
    )
