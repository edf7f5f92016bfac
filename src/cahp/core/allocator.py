"""The C allocator's handling of freed memory (glibc; a no-op elsewhere).

Two opposite needs, one per stage:

- the signature pass wants freed memory handed back (`release_freed_memory`):
  every batch allocates attention tensors of a new shape, and without a trim
  resident memory creeps up with the number of batches;
- timing wants freed memory kept (`hold_freed_memory`): by default glibc serves
  large blocks with fresh ``mmap`` pages and trims the heap top, so a forward
  pass that allocates and frees the same large activations on every call
  page-faults them in again each time: pages the kernel zeroes on every call,
  and an unequal number for models of different sizes (noise in their
  comparison). Once freed memory is held, the pages stay mapped. Holding
  memory is the usual CPU-inference setting (as jemalloc or tcmalloc do).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX): blocks
#: below it come from the heap once held; larger ones are always mapped afresh.
MMAP_THRESHOLD_MAX = 32 * 2**20
_INT_MAX = 2**31 - 1


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)  # the symbols already loaded into this process
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _libc_function("malloc_trim")
_MALLOPT = _libc_function("mallopt")
_HELD = False


def release_freed_memory() -> None:
    """Hand memory freed by the C allocator back to the system (glibc ``malloc_trim``; elsewhere a no-op).

    Every batch of the signature pass allocates attention tensors of a new
    shape. glibc raises its mmap threshold each time a large block is freed, so
    later blocks of that size come from the heap, where freed space stays in
    the process: without a trim, resident memory creeps up with the number of
    batches although nothing is kept between batches; the trim hands that
    space back after every batch (`benchmarks/bench_signatures.py` measures
    the pass's memory; RESULTS.md has the figures).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def hold_freed_memory() -> bool:
    """Keep freed memory in this process for reuse: no fresh pages for every large activation.

    Sets glibc's mmap threshold to its maximum (blocks up to 32 MiB come from
    the heap) and its trim threshold to 2 GiB (the heap top is not handed back
    after every call). Process-wide and permanent: meant for timing and
    serving processes; resident memory stays at its peak. Returns whether the
    setting applies (False where the C library is not glibc).
    """
    global _HELD
    if _MALLOPT is None:
        return False
    if not _HELD:
        ok = _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and _MALLOPT(_M_TRIM_THRESHOLD, _INT_MAX) == 1
        if not ok:
            log.warning("mallopt refused the thresholds: freed memory is handed back as glibc decides")
            return False
        _HELD = True
    return True


def memory_held() -> bool:
    """Whether `hold_freed_memory` has applied its setting in this process (it lasts)."""
    return _HELD
