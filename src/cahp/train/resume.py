"""Epoch checkpoints of `cahp.train.loop.train_loop`: an interrupted fine-tuning resumes after its last whole epoch.

A fine-tuning of a base-size model on a few CPU cores runs for hours; the stage cache
(`cahp.pipelines.cache`) keeps only finished stages, so without this an
interruption loses every epoch done. After each epoch the loop writes
everything the next epoch depends on: the model, AdamW's moments, the
schedule's step, torch's RNG state (dropout), the best epoch's state and
score, the epochs without improvement and the history. Batch orders are
seeded per epoch, so a resumed run makes the same batches and ends with the
same weights as an uninterrupted one.

A checkpoint is taken up only when its key (the fingerprint of everything the
fine-tuning depends on: the caller's stage key plus the loop's settings and
data size) matches; one written under other settings is discarded with a log
line. It is written atomically (temporary sibling, then rename) and removed
when the loop ends. Under torchrun (several processes) the loop keeps no
checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cahp.core.io import save_tensors

log = logging.getLogger(__name__)

__all__ = ["EpochCheckpoint"]


@dataclass(frozen=True)
class EpochCheckpoint:
    """Where a fine-tuning keeps its state after every epoch (``path``) and what it depends on (``key``)."""

    path: Path
    key: dict

    def with_settings(self, **settings) -> EpochCheckpoint:
        """The same checkpoint, its key extended by the loop's own settings."""
        return EpochCheckpoint(Path(self.path), {**self.key, **settings})

    @property
    def fingerprint(self) -> str:
        """The key as sorted JSON (non-JSON values by their str): what a stored state must carry."""
        return json.dumps(self.key, sort_keys=True, default=str)

    def load(self) -> dict | None:
        """The state of the last whole epoch, or None (no checkpoint, another key, or an unreadable file)."""
        path = Path(self.path)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: start afresh rather than fail
            log.warning("ignoring the unreadable epoch checkpoint %s (%s)", path, e)
            return None
        if not isinstance(state, dict) or state.get("key") != self.fingerprint:
            log.info("ignoring the epoch checkpoint %s: made under other settings", path)
            return None
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` (tensors, numbers, strings, lists and dicts of them) with this key, atomically."""
        save_tensors(self.path, {**state, "key": self.fingerprint})

    def clear(self) -> None:
        """Remove the checkpoint (the fine-tuning it belongs to has ended)."""
        Path(self.path).unlink(missing_ok=True)
