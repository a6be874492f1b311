"""Resident memory of this process, from the kernel's ``/proc/self/status``."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

MB = 2.0**20


def memory_status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current ``VmRSS``."""
    Path("/proc/self/clear_refs").write_text("5")


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the kernel (glibc ``malloc_trim``), so
    that resident memory counts live objects only."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
