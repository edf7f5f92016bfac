"""The C allocator policy: held freed memory means no page faults per call (glibc only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cahp.core import allocator

# Four 8 MiB blocks alive at once, then freed, five times (a forward pass's activations). The child
# first pins glibc's mmap threshold at its 128 KiB default (no dynamic raise), so every block is
# mapped afresh and page-faulted in: ~40,000 faults; `hold_freed_memory` must end that.
CHILD = """
import ctypes, resource, sys, torch
from cahp.core.allocator import hold_freed_memory, memory_held
ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: the default value, held fixed
def faults():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        xs = [torch.ones(2 * 2**20) for _ in range(4)]
        del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
before = faults()
held = hold_freed_memory()
faults()  # the first round after the change faults the heap in
print(held, memory_held(), before, faults())
"""


@pytest.mark.skipif(allocator._MALLOPT is None, reason="mallopt is glibc's")
def test_hold_freed_memory_stops_page_faults():
    out = subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True, text=True).stdout
    held, flag, before, after = out.split()
    assert held == flag == "True"
    assert int(before) > 10_000  # 160 MiB mapped afresh: one fault per 4 KiB page
    assert int(after) < 100


def test_release_freed_memory_runs():
    allocator.release_freed_memory()  # a no-op off glibc; never raises
