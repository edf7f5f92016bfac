"""A block run with a given number of torch CPU threads, the caller's count restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["num_threads"]


@contextmanager
def num_threads(n: int | None, error: type[ValueError] = ValueError) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``; the count from before is set again when it ends, also on
    an error. ``None`` leaves the count as it is. Timings use it so one measurement's thread count never leaks
    into the next or into the caller. A count that is not a positive integer raises ``error`` (a `ValueError`
    subclass, so a module can keep its own error type, e.g. `cahp.budget.cost.CostModelError`)."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise error(f"threads must be a positive integer, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
