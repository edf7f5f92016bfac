"""Deterministic hold-out splits (by SHA-256 of the row index) and lazily read split files."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from cahp.data.types import Example, TaskError

__all__ = ["Lazy", "holdout_indices", "holdout_loader", "split_holdout"]

_HOLDOUT_SALT = "cahp-holdout"


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


def split_holdout(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into (kept, held out) by :func:`holdout_indices`; both keep file order."""
    held = holdout_indices(len(examples), fraction)
    train = [ex for i, ex in enumerate(examples) if i not in held]
    dev = [ex for i, ex in enumerate(examples) if i in held]
    return train, dev


class Lazy:
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


def holdout_loader(
    files: dict[str, Callable[[], list[Example]]], source: str, fraction: float
) -> Callable[[str], list[Example]]:
    """A loader whose ``train``/``dev`` come from a hold-out of ``files[source]``; other splits read as-is."""
    parts = Lazy(lambda: split_holdout(files[source](), fraction))

    def load(split: str) -> list[Example]:
        if split == "train":
            return parts()[0]
        if split == "dev":
            return parts()[1]
        return files[split]()

    return load
