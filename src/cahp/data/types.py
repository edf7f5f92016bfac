"""The task types: :class:`Example`, :class:`Task` and :class:`TaskError`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["Example", "Task", "TaskError"]

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
