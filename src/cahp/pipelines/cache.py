"""One cache of stage results for both pipelines (`cahp prune`'s stages, `cahp compare`'s results).

A result is a file ``ROOT/NAME.json`` (or ``NAME.pt`` for tensors) that holds
the fingerprint of the settings it was computed with (``_key``) and the machine
that computed it (``_machine``). `StageCache.get_or_compute` returns the stored
result while its fingerprint matches, else computes, stores (atomically) and
returns it, and records per stage how long that took and whether it was cached.

Under torchrun (`cahp.core.distributed`) rank 0 alone reads and writes; every
rank gets rank 0's result, so all ranks take the same branch with the same
values. ``compute`` runs on every rank (it may use collectives).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cahp.core import distributed
from cahp.core.io import machine_label, read_json, save_tensors, to_jsonable, write_json
from cahp.train.resume import EpochCheckpoint

log = logging.getLogger(__name__)

__all__ = ["StageCache", "fingerprint"]


def fingerprint(obj) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted JSON (non-JSON values by their str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageCache:
    """Stage results under ``root``, each valid while the fingerprint of its settings matches.

    Args:
        root: the folder (created by rank 0).
        base: settings every key of this cache includes (merged under each key before fingerprinting).
        log_level: level of the one line logged per stage (cached, or its seconds).

    Attributes:
        times: stage label -> {"seconds", "cached"} of the latest lookup.
        first: result name -> whether its first lookup here was served from its file (a result looked up
            again after being computed counts once, as computed).
        hits, computed: how many lookups were served from files and how many computed.
    """

    def __init__(self, root: Path, base: dict | None = None, log_level: int = logging.INFO):
        self.root = Path(root)
        distributed.on_main(self.root.mkdir, parents=True, exist_ok=True)
        self.base = dict(base or {})
        self.log_level = log_level
        self.times: dict[str, dict] = {}
        self.first: dict[str, bool] = {}
        self.hits = 0
        self.computed = 0
        self.machine = machine_label()

    def get_or_compute(self, name: str, key: dict, compute: Callable[[], dict], *, tensors: bool = False,
                       label: str | None = None, artifact: Path | None = None,
                       artifact_check: Callable[[Path], bool] = Path.is_file) -> dict:
        """The stored result ``name`` if computed with ``key``, else ``compute()``'s result, stored.

        Args:
            name: file name without suffix, unique among the results under ``root``.
            key: the settings the result depends on.
            compute: returns a dict of JSON values (or, with ``tensors``, of tensors and picklable values).
            tensors: store with torch.save (``.pt``) instead of JSON; JSON results are returned in their
                JSON form (string keys, lists), the same whether computed now or read later.
            label: the stage name in `times` (default: ``name``).
            artifact: a path ``compute`` also writes (e.g. a model folder); a stored result counts only
                while ``artifact_check(artifact)`` holds on rank 0.

        Returns:
            The result with ``_key`` (the fingerprint) and ``_machine`` added; rank 0's on every rank.
        """
        t0 = time.perf_counter()
        fp = fingerprint({**self.base, **key})
        path = self.root / f"{name}.{'pt' if tensors else 'json'}"
        data = distributed.on_main(self._read, path, fp, tensors, artifact, artifact_check)
        cached = data is not None
        if cached:
            self.hits += 1
        else:
            data = {**compute(), "_key": fp, "_machine": self.machine}
            if not tensors:
                data = json.loads(json.dumps(to_jsonable(data)))
            data = distributed.broadcast_object(data)
            distributed.on_main(save_tensors if tensors else write_json, path, data)
            self.computed += 1
        seconds = time.perf_counter() - t0
        label = label or name
        self.first.setdefault(name, cached)
        self.times[label] = {"seconds": round(seconds, 2), "cached": cached}
        log.log(self.log_level, "stage %s: %s", label, "cached" if cached else f"{seconds:.1f} s")
        return data

    def epoch_checkpoint(self, name: str, key: dict) -> EpochCheckpoint:
        """Where the fine-tuning inside stage ``name`` (computed under ``key``) keeps its epochs
        (`cahp.train.resume`): ``ROOT/NAME.epoch.pt``, keyed like the stage itself."""
        return EpochCheckpoint(self.root / f"{name}.epoch.pt", {**self.base, **key})

    @staticmethod
    def _read(path: Path, fp: str, tensors: bool, artifact: Path | None, artifact_check) -> dict | None:
        """The stored result if its fingerprint is ``fp`` (and the artifact is there); None otherwise."""
        if not path.is_file() or (artifact is not None and not artifact_check(artifact)):
            return None
        try:
            data = torch.load(path, weights_only=False) if tensors else read_json(path)
        except (ValueError, EOFError, RuntimeError):  # a damaged file: compute again
            log.warning("ignoring unreadable cached result %s", path)
            return None
        return data if isinstance(data, dict) and data.get("_key") == fp else None
