"""Reading models tensor by tensor: a state dict in a file (safetensors, or a torch file read with
``mmap=True, weights_only=True``; an ESPnet model file, or a checkpoint's ``model`` / ``module``
entry) or in memory. Nothing is read before it is asked for, so a merge holds one tensor per model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.files import is_torch_zip


class TensorSource:
    """The named tensors of one model, read on demand."""

    def __init__(self, name: str, keys: list[str], reader: Any) -> None:
        self.name = name
        self._keys = keys
        self._reader = reader

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, key: str) -> torch.Tensor:
        return self._reader(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)


def open_source(model: str | Path | Mapping[str, torch.Tensor], name: str | None = None) -> TensorSource:
    """A ``TensorSource`` over a state dict in memory or in a file (see the module docstring)."""
    if isinstance(model, Mapping):
        return TensorSource(name or "state dict", list(model), model.__getitem__)
    path = Path(model)
    if not path.is_file():
        raise PeftConfigError(f"model file {str(path)!r} does not exist; check the path")
    if not is_torch_zip(path):
        return _safetensors_source(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise PeftConfigError(
            f"{str(path)!r} is not a readable model file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'})"
        ) from None
    if isinstance(state, dict) and "module" in state and isinstance(state["module"], dict):
        state = state["module"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise PeftConfigError(f"{str(path)!r} does not hold a state dict of tensors")
    return TensorSource(str(path), list(state), state.__getitem__)


def _safetensors_source(path: Path) -> TensorSource:
    try:
        handle = safe_open(str(path), framework="pt")
        keys = list(handle.keys())
    except Exception as error:
        raise PeftConfigError(
            f"{str(path)!r} is not a readable model file ({type(error).__name__}: {error})"
        ) from None
    return TensorSource(str(path), keys, handle.get_tensor)
