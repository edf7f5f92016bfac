"""The task registry: :func:`get_task` builds a built-in or user task by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cahp.data.builtin import make_rte, make_sst2, make_sst5
from cahp.data.folder import DataRoot
from cahp.data.mnli import make_mnli, make_mnli_small
from cahp.data.types import Task, TaskError
from cahp.data.user import make_user_task

__all__ = ["available_tasks", "get_task"]


_REGISTRY: dict[str, Callable[..., Task]] = {
    "sst5": make_sst5,
    "sst2": make_sst2,
    "rte": make_rte,
    "mnli": make_mnli,
    "mnli-small": make_mnli_small,
}
_ALIASES = {"sst-5": "sst5", "sst-2": "sst2", "mnli_small": "mnli-small", "mnlismall": "mnli-small"}


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
        return make_user_task(raw[4:], **kwargs)
    key = raw.lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key](DataRoot(data_dir), **kwargs)
    if raw and Path(raw).expanduser().is_dir():
        return make_user_task(raw, **kwargs)
    raise TaskError(
        f"unknown task {name!r}; available: {', '.join(available_tasks())}, or 'csv:<folder>' for a folder "
        "with train.{csv,tsv,jsonl} (and optional dev.*, test.*)"
    )
