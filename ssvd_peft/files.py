"""File handling shared by adapter files and merged models: which container a file is, and
writing atomically (a temporary file beside the target, then a rename), so a failed write leaves
nothing behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"


def is_torch_zip(path: Path) -> bool:
    """Whether ``path`` is a torch file (a zip archive) rather than, say, safetensors."""
    with path.open("rb") as f:
        return f.read(4) == ZIP_MAGIC


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` and move the result to ``path``; remove it if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
