"""Giving freed memory back to the operating system between tensors.

glibc's allocator keeps freed blocks for reuse, and after large frees raises the size above which it
maps blocks on their own, so a merge that frees one tensor's buffers and allocates the next one's
would keep every peak resident. ``release_freed_memory`` asks glibc (``malloc_trim(0)``) to return
what is free after each merged tensor; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the allocator's free memory to the system (glibc only)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
