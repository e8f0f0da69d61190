"""Freed heap memory goes back to the system when the engine is built (glibc only)."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from molink.quant.memory import return_freed_memory

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or ctypes.util.find_library("c") is None,
    reason="malloc_trim is glibc's",
)


def test_freed_small_buffers_leave_resident_memory() -> None:
    return_freed_memory()  # what the test process freed before
    # 1 KiB objects come from malloc's heap (not its own mappings, which free returns).
    buffers = [bytes(1024) + bytes([i % 256]) for i in range(65536)]
    # Allocated after them, these keep the heap's top in use, as a loaded model's buffers
    # do: free() alone gives back only a free top, so the 64 MiB below stay resident.
    pinned = [bytes(1024) + bytes([i]) for i in range(64)]
    del buffers
    assert return_freed_memory() >= 32 * 2**20
    assert len(pinned) == 64
