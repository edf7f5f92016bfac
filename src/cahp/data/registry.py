"""The task registry: :func:`get_task` builds a built-in or user task by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cahp.data.builtin import make_rte, make_sst2, make_sst5, make_stsb
from cahp.data.folder import DataRoot
from cahp.data.mnli import make_mnli, make_mnli_small
from cahp.data.types import TASK_TYPES, Task, TaskError
from cahp.data.user import make_user_task

__all__ = ["available_tasks", "get_task"]


_REGISTRY: dict[str, Callable[..., Task]] = {
    "sst5": make_sst5,
    "sst2": make_sst2,
    "rte": make_rte,
    "mnli": make_mnli,
    "mnli-small": make_mnli_small,
    "stsb": make_stsb,
}
_ALIASES = {
    "sst-5": "sst5",
    "sst-2": "sst2",
    "mnli_small": "mnli-small",
    "mnlismall": "mnli-small",
    "sts-b": "stsb",
    "sts_b": "stsb",
}


def available_tasks() -> list[str]:
    """Names of the built-in tasks (user tasks are given as ``"csv:<folder>"`` or a folder path).

    Returns:
        Sorted task names.
    """
    return sorted(_REGISTRY)


def get_task(
    name: str, data_dir: str | os.PathLike | None = None, task_type: str | None = None, **kwargs: Any
) -> Task:
    """Build a task by name.

    Args:
        name: A built-in task (:func:`available_tasks`; ``sst-5``/``sst-2`` are accepted too), or
            ``"csv:<folder>"``, or the path of an existing folder, for a user task.
        data_dir: The data directory for built-in tasks; see :func:`resolve_data_dir`.
        task_type: ``"classification"``, ``"regression"`` or ``None`` (detect). A user task with
            ``None`` is a regression task when every training label is a number and one is not an
            integer (``3.8``). A built-in task has a fixed type: another value is an error.
        **kwargs: Task options. User tasks: ``text_column="text"``, ``text_pair_column=None``,
            ``label_column="label"``, ``label_names=None`` (fixes the label order), ``holdout=0.1``.
            ``sst2``/``rte``/``stsb``/``mnli``: ``holdout`` (0.05/0.10/0.10/0.02). ``mnli``:
            ``allow_hub=True``. A built-in task ignores options given as ``None`` (unset).

    Returns:
        The task. Files are checked for existence now and parsed on first :meth:`Task.load`
        (user tasks read their training file now, to fix the labels).

    Raises:
        TaskError: Unknown task or missing/malformed data.
        TypeError: An option the task does not take.
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise TaskError(f"unknown task type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    raw = str(name).strip()
    if raw.lower().startswith("csv:"):
        return make_user_task(raw[4:], task_type=task_type, **kwargs)
    key = raw.lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        task = _REGISTRY[key](DataRoot(data_dir), **{k: v for k, v in kwargs.items() if v is not None})
        if task_type is not None and task_type != task.task_type:
            raise TaskError(f"task {task.name!r} is a {task.task_type} task, not {task_type}")
        return task
    if raw and Path(raw).expanduser().is_dir():
        return make_user_task(raw, task_type=task_type, **kwargs)
    raise TaskError(
        f"unknown task {name!r}; available: {', '.join(available_tasks())}, or 'csv:<folder>' for a folder "
        "with train.{csv,tsv,jsonl} (and optional dev.*, test.*)"
    )
