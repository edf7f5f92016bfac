"""Output folders: atomic files, a log file beside the results, JSON helpers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cahp.core.version import __version__


def to_jsonable(obj: Any) -> Any:
    """numpy / torch scalars and arrays, Paths and tuples -> plain JSON types; NaN and infinities -> None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):  # NaN and infinities are not JSON
        return None
    return obj


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """When and where a result is made: UTC date, versions, processor, cores, threads, GPU.

    Written into every report (``report.json``, ``compare.json``, ``cahp bench --out``)
    so that an output folder says what produced it.
    """
    import transformers

    cpu = cpu_name()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cahp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_label(env: dict | None = None) -> str:
    """One line naming the hardware of an `environment` (GPU if any, else CPU and cores) and its threads."""
    env = env or environment()
    where = f"GPU {env['gpu']}" if env.get("gpu") else f"{env['cpu']}, {env['cores']} cores"
    return f"{where}, torch threads {env['torch_threads']}"


def current_umask() -> int:
    """The process umask (read by setting it and restoring it: there is no other portable way)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permission bits of a new file under the umask, as ``open`` gives (``0o666 & ~umask``)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Permission bits of a new folder under the umask, as ``mkdir`` gives (``0o777 & ~umask``)."""
    return 0o777 & ~current_umask()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file via a temporary sibling and rename: readers never see half a file.

    The file gets the permissions of a plain ``open`` under the umask (mkstemp's own are 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_atomic(path, json.dumps(to_jsonable(obj), indent=1) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """Atomic torch.save of a dict of tensors (stage caches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, file_mode())  # torch.save keeps the mode of the file it overwrites
    os.close(fd)
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def add_log_file(path: str | os.PathLike) -> logging.Handler:
    """Also write the ``cahp`` loggers' records to ``path`` (appending)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("cahp")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler
