"""Giving a process's freed memory back to the system between units of work.

A Dask worker reads one part or bucket after another. What a finished unit freed stays with the
process (glibc keeps freed heap for reuse, Arrow's jemalloc pool keeps pages for a while), so a
worker's resident memory is the high-water mark of every unit it ran plus the next one's. Between
units that memory is returned: each unit then starts from the worker's base.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import pyarrow as pa  # type: ignore[import-untyped]


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_memory() -> None:
    """Return freed memory to the system: Arrow's pool and, on glibc, the C heap."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
