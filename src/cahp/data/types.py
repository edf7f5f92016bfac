"""The task types: :class:`Example`, :class:`Task` and :class:`TaskError`."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["TASK_TYPES", "Example", "Task", "TaskError"]

#: What a task predicts: a class id (``classification``) or a float score (``regression``, one model output).
TASK_TYPES = ("classification", "regression")


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled example.

    Attributes:
        text: The (first) text.
        text_pair: The second text of a sentence-pair task, else ``None``.
        label: The class id, ``0 <= label < task.num_labels`` (an ``int``), or for a regression task the
            target score (a finite ``float``).
    """

    text: str
    text_pair: str | None
    label: int | float


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
    """A classification or regression task with named splits.

    Attributes:
        name: Registry name (``"sst5"``, ...) or ``"csv:<folder>"`` for user tasks.
        num_labels: Number of classes; 1 for a regression task (the model has one output).
        label_names: One name per class id (for regression: the name of the score).
        splits: All split names :meth:`load` accepts.
        train_split: The split to train on.
        dev_split: The split for early stopping / model selection.
        test_split: The split for final reporting (never used for selection).
        extra_eval_splits: Further evaluation-only splits (e.g. MNLI mismatched).
        is_pair: Whether examples are sentence pairs (``text_pair`` set).
        data_dir: The data directory the task reads from (``None`` for user tasks).
        description: One line saying where the data comes from.
        task_type: ``"classification"`` or ``"regression"`` (see :data:`TASK_TYPES`).
        split_files: For each split, the file it is read from (a hold-out split names its source file);
            empty where the data does not come from local files (the Hub).
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
    task_type: str = "classification"
    split_files: dict[str, Path] = field(default_factory=dict, compare=False)
    loader: Callable[[str], list[Example]] | None = field(default=None, repr=False, compare=False)
    _cache: dict[str, list[Example]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise TaskError(f"task {self.name!r}: unknown task type {self.task_type!r}; use one of {TASK_TYPES}")
        if self.task_type == "regression" and self.num_labels != 1:
            raise TaskError(f"task {self.name!r}: a regression task has num_labels 1, not {self.num_labels}")

    @property
    def is_regression(self) -> bool:
        """Whether labels are float scores (one model output, MSE loss) rather than class ids."""
        return self.task_type == "regression"

    def _where(self, split: str) -> str:
        path = self.split_files.get(split)
        return f"task {self.name!r}, split {split!r}" + (f" ({path})" if path is not None else "")

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
                raise TaskError(f"{self._where(split)} is empty")
            for i, ex in enumerate(examples):  # defensive; readers already check, with line numbers
                self._check_label(ex.label, split, i)
            self._cache[split] = examples
            logger.info("task %s: loaded %d examples for split %r", self.name, len(examples), split)
        return list(self._cache[split])

    def _check_label(self, label: int | float, split: str, i: int) -> None:
        if self.is_regression:
            ok = isinstance(label, float) and math.isfinite(label)
            want = "a finite float score"
        else:
            ok = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < self.num_labels
            want = f"a class id 0..{self.num_labels - 1}"
        if not ok:
            raise TaskError(f"{self._where(split)}, example {i + 1}: label {label!r} is not {want}")

    def validate(self) -> dict[str, dict]:
        """Parse every split and check it before any work: call it before fine-tuning starts.

        Checks, beyond what parsing checks line by line (file, line and problem in the message): no
        empty text (nor an empty or missing second text in a pair task), labels valid for the task type,
        at least two classes (or two distinct scores) in the training split. A class of an evaluation
        split that the training split lacks is logged as a warning.

        Returns:
            Per split: ``{"n": examples, "label_counts": [per class]}`` for classification, or
            ``{"n", "mean", "std", "min", "max"}`` of the scores for regression.

        Raises:
            TaskError: The first problem found, naming the task, split and file.
        """
        summary: dict[str, dict] = {}
        for split in self.splits:
            examples = self.load(split)
            for i, ex in enumerate(examples):
                where = f"{self._where(split)}, example {i + 1}"
                if not ex.text.strip():
                    raise TaskError(f"{where}: empty text")
                if self.is_pair and (ex.text_pair is None or not ex.text_pair.strip()):
                    raise TaskError(f"{where}: empty second text in a sentence-pair task")
                if not self.is_pair and ex.text_pair is not None:
                    raise TaskError(f"{where}: a second text in a single-text task")
            summary[split] = self._summarise([ex.label for ex in examples])
        train = summary[self.train_split]
        if self.is_regression:
            if train["min"] == train["max"]:
                raise TaskError(
                    f"{self._where(self.train_split)}: every score is {train['min']}; regression needs "
                    "at least two distinct values"
                )
            return summary
        present = [k for k, c in enumerate(train["label_counts"]) if c]
        if len(present) < 2:
            names = ", ".join(repr(self.label_names[k]) for k in present)
            raise TaskError(
                f"{self._where(self.train_split)}: only one class ({names}); classification needs at least two"
            )
        for split, info in summary.items():
            unseen = [self.label_names[k] for k, c in enumerate(info["label_counts"]) if c and k not in present]
            if unseen and split != self.train_split:
                logger.warning(
                    "%s has class(es) %s that the training split lacks", self._where(split), ", ".join(unseen)
                )
        return summary

    def _summarise(self, labels: list[int | float]) -> dict:
        if self.is_regression:
            n = len(labels)
            mean = sum(labels) / n
            std = math.sqrt(sum((y - mean) ** 2 for y in labels) / n)
            return {"n": n, "mean": mean, "std": std, "min": min(labels), "max": max(labels)}
        counts = Counter(labels)
        return {"n": len(labels), "label_counts": [counts.get(k, 0) for k in range(self.num_labels)]}
