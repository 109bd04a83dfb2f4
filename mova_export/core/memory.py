"""Giving freed memory back to the system during a long build (glibc's malloc; a no-op elsewhere).

A full-size build is one process that allocates and frees arrays of 10 to 400 MB for an hour (ONNX Runtime outputs,
calibration tensors, probe results). glibc raises its mmap threshold each time such a block is freed (up to 32 MB),
so later blocks below it come from the heap, and a heap fragmented by small live objects is never given back: the
full-size cpu build held 10.9 GB of [heap] during one tower's calibration. A fixed threshold keeps every large
block in its own mapping, returned when it is freed, and a trim after each build unit returns the rest.
"""
from __future__ import annotations

import ctypes
import gc
import sys

_M_MMAP_THRESHOLD = -3                 # mallopt parameter numbers from glibc's malloc.h
LARGE_BLOCK = 1 << 20                  # blocks from 1 MiB up get their own mapping


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                    # musl and other C libraries: nothing to tune
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def return_large_blocks_when_freed(threshold: int = LARGE_BLOCK) -> bool:
    """Fix glibc's mmap threshold (no dynamic growth): True when it took effect."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, threshold))


def release_freed_memory() -> bool:
    """Collect garbage and return the heap's free pages to the system: True when glibc gave any back."""
    gc.collect()
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
