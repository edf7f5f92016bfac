"""Where the data directory is: ``--data-dir``, ``$CAHP_DATA_DIR`` or ``../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

from cahp.data.types import TaskError

__all__ = ["DATA_DIR_ENV", "DATA_DIR_HELP", "DataRoot", "resolve_data_dir"]

DATA_DIR_ENV = "CAHP_DATA_DIR"
DATA_DIR_HELP = f"set the data directory with --data-dir or the {DATA_DIR_ENV} environment variable"


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


class DataRoot:
    """A resolved data directory that remembers how it was chosen, for error messages."""

    def __init__(self, data_dir: str | os.PathLike | None):
        self.path, self.source = _resolve_data_dir_with_source(data_dir)

    def require(self) -> Path:
        """The directory; raises TaskError when none was found or it is not a directory."""
        if self.path is None:
            raise TaskError(
                "no data directory found: none was given and no ../shared/data exists next to the current "
                f"directory or the repository root; {DATA_DIR_HELP}"
            )
        if not self.path.is_dir():
            raise TaskError(
                f"data directory {self.path} (set by {self.source}) does not exist or is not a directory; "
                f"{DATA_DIR_HELP}"
            )
        return self.path

    def missing(self, *paths: Path, what: str = "data file") -> TaskError:
        """A TaskError for data files not found, naming the paths and how the directory was chosen."""
        looked = " or ".join(str(p) for p in paths)
        return TaskError(
            f"{what} not found: {looked} (data directory {self.path}, set by {self.source}); {DATA_DIR_HELP}"
        )
