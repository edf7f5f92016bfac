"""Checks before work, and the output folder's guards: one lock per folder, no silent replacement.

- `build_task` makes a task from the command's options (columns, pair column, task type) and
  `check_run` checks every option of `cahp prune` / `cahp compare` against the task and the model's
  config (read without loading weights) before any fine-tuning starts: a bad line in the test file
  or ``--keep 73`` on a 72-head model fails in seconds, not after the first fine-tuning.
- `clip_max_length` clips ``--max-length`` to what the position embeddings cover, with a warning.
- `RunLock` refuses a second run in the same output folder; a lock left by a killed run (its process
  is gone) is taken over with a warning.
- `check_final_settings` refuses to replace ``model/``, ``report.json`` and the figures of a run made
  with other final-model settings unless ``overwrite`` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from cahp.core.io import add_log_file, read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["LockError", "RunConflictError", "RunLock", "build_task", "check_final_settings", "check_identity",
           "check_run", "clip_max_length", "model_config", "new_head_reason", "output_folder",
           "removable_after_failure", "split_train"]

#: Settings that do not change what a run computes (where it writes, whether it may replace).
NOT_DEFINING = ("output_dir", "overwrite")
LOCK_NAME = ".cahp.lock"


class RunConflictError(ValueError):
    """The output folder holds a run made with other settings."""


class LockError(ValueError):
    """Another run holds the output folder."""


def is_user_task(name: str) -> bool:
    """Whether ``name`` names a user task (``csv:<folder>`` or an existing folder) rather than a built-in one."""
    raw = str(name).strip()
    return raw.lower().startswith("csv:") or (bool(raw) and Path(raw).expanduser().is_dir())


def build_task(name: str, data_dir: str | None = None, text_column: str = "text", text_pair_column: str | None = None,
               label_column: str = "label", task_type: str | None = None):
    """The task of a command's options; the column options apply to user tasks only.

    ``task_type`` None or "auto": detected from a user task's labels (a built-in task has its own type).
    """
    from cahp.data.tasks import get_task

    task_type = None if task_type in (None, "", "auto") else task_type
    if is_user_task(name):
        return get_task(name, data_dir=data_dir or None, task_type=task_type, text_column=text_column,
                        text_pair_column=text_pair_column or None, label_column=label_column)
    given = [opt for opt, value, default in (("--text-column", text_column, "text"),
                                             ("--text-pair-column", text_pair_column or None, None),
                                             ("--label-column", label_column, "label")) if value != default]
    if given:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to user tasks (a folder); "
                         f"{name!r} is a built-in task with its own columns")
    return get_task(name, data_dir=data_dir or None, task_type=task_type)


def split_train(n: int, curve_examples: int, calibration_examples: int, seed: int):
    """Seeded, disjoint (curve, calibration, finetune) index lists of the training split."""
    if curve_examples + min(calibration_examples, 1) >= n:
        raise ValueError(
            f"the training split has {n} examples, too few to hold out {curve_examples} for the curve "
            f"and still train; lower --curve-examples"
        )
    perm = np.random.default_rng(seed).permutation(n)
    curve = sorted(perm[:curve_examples].tolist())
    rest = perm[curve_examples:]
    calib = sorted(rest[: min(calibration_examples, len(rest))].tolist())
    train = sorted(rest.tolist())
    return curve, calib, train


def model_config(name_or_path: str):
    """The model's config (a pruned folder's with its kept heads), read without weights; None if not readable here.

    None leaves the checks that need it to the model loading, which reports the problem itself.
    """
    import transformers

    from cahp.arch.hub import load_config
    from cahp.model.checkpoint import is_pruned_folder
    from cahp.model.loading import resolve_model

    path = Path(name_or_path).expanduser()
    if path.is_dir() and is_pruned_folder(path):
        return load_config(path)
    source = resolve_model(name_or_path)  # ModelLoadError for a folder that is no model folder
    if not Path(source).is_dir():
        return None  # a Hub id: the loading decides whether it is reachable
    return transformers.AutoConfig.from_pretrained(source)


def clip_max_length(max_length: int, config, what: str = "--max-length") -> int:
    """``max_length`` clipped to the longest input the model's position embeddings cover (warning if clipped)."""
    if config is None:
        return max_length
    from cahp.arch import get_adapter

    try:
        limit = int(get_adapter(config).max_positions(config))
    except ValueError:  # an architecture cahp does not know: the loading names it
        return max_length
    if max_length > limit:
        log.warning("%s %d is more than the model's %d positions: using %d", what, max_length, limit, limit)
        return limit
    return max_length


def new_head_reason(config, num_labels: int) -> str | None:
    """Why loading ``config``'s model for ``num_labels`` outputs would initialise a new classification head
    (None if it keeps a trained one). Pruned folders always carry their head (or fail to load)."""
    if config is None or getattr(config, "cahp_kept_heads", None) is not None:
        return None
    archs = getattr(config, "architectures", None) or []
    if not any("ForSequenceClassification" in a for a in archs):
        return f"it has no classification head ({', '.join(archs) or 'no architecture recorded'})"
    if getattr(config, "num_labels", None) != num_labels:
        return f"its classification head has {config.num_labels} outputs, the task needs {num_labels}"
    return None


def _check_counts(cfg) -> None:
    if cfg.keep < 0:
        raise ValueError(f"--keep must be >= 0 (0: unset, the knee decides), got {cfg.keep}")
    if not 0 <= cfg.keep_ratio <= 1:
        raise ValueError(f"--keep-ratio must be in (0, 1] (0: unset, the knee decides), got {cfg.keep_ratio}")
    if cfg.keep and cfg.keep_ratio:
        raise ValueError("give --keep or --keep-ratio, not both")
    for name in ("calibration_examples", "curve_examples", "stats_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.grid_step < 0 or cfg.degree < 0:
        raise ValueError(f"--grid-step and --degree must be >= 0 (0: automatic), got {cfg.grid_step}, {cfg.degree}")
    if not 0 < cfg.min_ratio <= 1:
        raise ValueError(f"--min-ratio must be in (0, 1], got {cfg.min_ratio}")
    if getattr(cfg, "target_speedup", 0) and not getattr(cfg, "ffn", False):
        raise ValueError("--target-speedup sets the budget of --ffn (heads and neurons); heads only: use --keep "
                         "or --keep-ratio")


def check_run(cfg, ft_cfg):
    """Every check of a prune or compare run that needs no weights: ``(task, ft_cfg, metric)``.

    Parses and validates every split of the task, checks every option (counts, ``--keep`` against the
    model's heads, the metric against the task type, the held-out sizes against the training split),
    refuses a fresh classification head with ``--finetuned`` unless ``allow_new_head``, and returns
    the fine-tuning settings with ``max_length`` clipped to the model's limit.
    """
    from cahp.model.heads import num_kept
    from cahp.train.finetune import check_config
    from cahp.train.metrics import resolve_metric

    _check_counts(cfg)
    check_config(ft_cfg)
    task = build_task(cfg.task, cfg.data_dir, cfg.text_column, cfg.text_pair_column, cfg.label_column,
                      cfg.task_type)
    task.validate()
    metric = resolve_metric(ft_cfg.metric, task.task_type, task.num_labels)
    split_train(len(task.load(task.train_split)), cfg.curve_examples, cfg.calibration_examples, cfg.seed)
    config = model_config(cfg.model)
    if config is not None:
        n = num_kept(config)
        if cfg.keep > n:
            raise ValueError(f"cannot keep {cfg.keep} heads: the model has {n}; choose 1..{n}")
        reason = new_head_reason(config, task.num_labels)
        if cfg.finetuned and reason and not cfg.allow_new_head:
            raise ValueError(f"--finetuned, but {cfg.model}'s classification head would be new: {reason}; "
                             "drop --finetuned to fine-tune it, or pass --allow-new-head")
        ft_cfg = dataclasses.replace(ft_cfg, max_length=clip_max_length(ft_cfg.max_length, config))
    return task, ft_cfg, metric


def final_settings(cfg, ft_cfg) -> dict:
    """The settings that define a run's final model and report (all but where it writes and ``overwrite``)."""
    prune = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_DEFINING}
    return json.loads(json.dumps({"prune": prune, "finetune": dataclasses.asdict(ft_cfg)}, default=str))


def check_final_settings(out: Path, cfg, ft_cfg) -> None:
    """Refuse to replace ``out``'s model/, report.json and figures made with other settings, unless ``overwrite``.

    A setting the earlier report does not record (an option added since) counts as its default.
    """
    path = out / "report.json"
    if not path.is_file():
        return
    try:
        old = read_json(path).get("settings")
    except (OSError, ValueError):
        return  # a damaged report protects nothing
    if not isinstance(old, dict) or "prune" not in old:
        return  # a report without the settings of `cahp prune` (another pipeline's): nothing to compare
    new = final_settings(cfg, ft_cfg)
    defaults = final_settings(type(cfg)(), type(ft_cfg)())
    diff = sorted(f"{part}.{k}" if part != "prune" else k for part in new for k, v in new[part].items()
                  if old.get(part, {}).get(k, defaults[part].get(k)) != v)
    if not diff:
        return
    if not cfg.overwrite:
        raise RunConflictError(
            f"{out} holds model/ and report.json of a run with other settings ({', '.join(diff)} differ); pass "
            "--overwrite to replace them (the cached statistics are reused) or choose another --output-dir")
    log.warning("--overwrite: model/, report.json and the figures in %s will be replaced (%s changed)", out,
                ", ".join(diff))


def check_identity(out: Path, identity: dict, overwrite: bool, fingerprints: dict) -> None:
    """run.json: the settings that define the run (a folder of another run is refused) and what it read."""
    path = out / "run.json"
    if path.is_file():
        old = read_json(path)
        seen = old.pop("fingerprints", None)
        if seen is not None and seen != fingerprints:
            changed = sorted(k for k in set(seen) | set(fingerprints) if seen.get(k) != fingerprints.get(k))
            log.warning("%s changed since the last run in %s: the stages that read it run again", " and ".join(
                changed), out)
        if old != json.loads(json.dumps(identity, default=str)):
            if not overwrite:
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise RunConflictError(
                    f"{out} holds a run with other settings ({', '.join(diff)} differ); "
                    f"choose another --output-dir or pass --overwrite"
                )
            log.warning("overwriting %s: it held a run with other settings", out)
            shutil.rmtree(out / "stages", ignore_errors=True)
    write_json(path, {**identity, "fingerprints": fingerprints})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """``OUTPUT/.cahp.lock`` (pid, host, start time) for the duration of a run; a context manager.

    A second run in the same folder gets a `LockError`; a lock whose process is gone (same host) is taken
    over with a warning. A lock from another host cannot be checked: the message says how to remove it.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.record = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        self.held = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a stale lock is removed once, then taken like a free one
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            self.held = True
            return self
        raise LockError(f"{self.path} could not be taken: another run took it first")

    def _take_over_or_refuse(self) -> None:
        try:
            other = json.loads(self.path.read_text())
            pid, host, started = int(other["pid"]), str(other["host"]), other.get("started", "?")
        except (OSError, ValueError, KeyError, TypeError):
            raise LockError(f"{self.path} exists but is unreadable: if no cahp run uses {self.path.parent}, "
                            "remove the file") from None
        if host == self.record["host"] and (pid == os.getpid() or not _alive(pid)):
            if pid != os.getpid():
                log.warning("taking over %s: its run (pid %d, started %s) is gone", self.path, pid, started)
            self.path.unlink(missing_ok=True)
            return
        where = "" if host == self.record["host"] else f" on host {host} (if it is gone, remove {self.path})"
        raise LockError(f"another cahp run (pid {pid}{where}, started {started}) is using {self.path.parent}; "
                        "wait for it or choose another --output-dir")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


@contextlib.contextmanager
def output_folder(out: Path, main: bool = True):
    """A run's hold on its output folder: created (by rank 0), logged into ``log.txt``, locked (`RunLock`).

    On an error before anything was made (`removable_after_failure`), a folder this call created is removed:
    a command that fails early leaves no new folder behind. Other ranks (``main`` False) touch nothing.
    """
    out = Path(out)
    created = not out.exists()
    handler, lock = None, RunLock(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        handler = add_log_file(out / "log.txt")
    try:
        if main:
            lock.__enter__()
        yield out
    except BaseException:
        if main and created and removable_after_failure(out):
            _close_log(handler)
            handler = None
            lock.__exit__()
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        lock.__exit__()
        _close_log(handler)


def _close_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger("cahp").removeHandler(handler)
        handler.close()


def removable_after_failure(out: Path) -> bool:
    """Whether a folder a failed command created holds nothing worth keeping (only its log, run record, lock)."""
    keep_out = {"log.txt", "run.json", LOCK_NAME}
    return all(p.is_dir() and not any(f.is_file() for f in p.rglob("*")) or p.name in keep_out
               for p in out.iterdir())
