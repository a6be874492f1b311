"""Reading models tensor by tensor: a state dict in a torch file (an ESPnet model file, or a
checkpoint's ``model`` / ``module`` entry), in a safetensors file, or in memory.

A file is opened once; its index (names, dtypes, shapes, where the bytes are) is read, and a
tensor's bytes are read with ordinary file reads only when it is asked for, into memory the
caller owns. Nothing is memory-mapped: pages of a mapped file count in the process's resident
memory once touched, so a merge of T mapped models would end up holding all of them, while here
it holds one tensor per model.

Torch files are read as ``torch.load(..., weights_only=True)`` reads them, by a restricted
unpickler: only state-dict containers, tensor rebuilds and storage types; anything else is refused.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.files import is_torch_zip

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

STORAGE_DTYPES = {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor is without its data: dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]


class TensorSource:
    """The named tensors of one model, read on demand; ``specs`` maps a name to its dtype and shape
    (a file's index, or a lookup that reads the tensor of a state dict in memory)."""

    def __init__(self, name: str, keys: list[str], specs: Callable[[str], TensorSpec], reader: Any) -> None:
        self.name = name
        self._keys = keys
        self._specs = specs
        self._reader = reader

    def keys(self) -> list[str]:
        return list(self._keys)

    def spec(self, key: str) -> TensorSpec:
        return self._specs(key)

    def get(self, key: str) -> torch.Tensor:
        return self._reader(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)


def open_source(model: str | Path | Mapping[str, torch.Tensor], name: str | None = None) -> TensorSource:
    """A ``TensorSource`` over a state dict in memory or in a file (see the module docstring)."""
    if isinstance(model, Mapping):

        def spec(key: str) -> TensorSpec:
            return TensorSpec(model[key].dtype, tuple(model[key].shape))

        return TensorSource(name or "state dict", list(model), spec, model.__getitem__)
    path = Path(model)
    if not path.is_file():
        raise PeftConfigError(f"model file {str(path)!r} does not exist; check the path")
    try:
        return torch_file_source(path) if is_torch_zip(path) else safetensors_source(path)
    except PeftConfigError:
        raise
    except Exception as error:
        raise PeftConfigError(
            f"{str(path)!r} is not a readable model file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'})"
        ) from None


def read_exactly(handle: BinaryIO, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` bytes of ``handle`` as a flat tensor of ``dtype``, read straight into its memory."""
    data = torch.empty(count, dtype=torch.uint8)
    if count and handle.readinto(data.numpy()) != count:
        raise PeftConfigError("the file ends before the data its index announces; it is truncated")
    return data.view(dtype)


def safetensors_source(path: Path) -> TensorSource:
    """A safetensors file: an 8-byte header length, a JSON index, then the tensors' bytes."""
    handle = path.open("rb")
    (length,) = struct.unpack("<Q", handle.read(8))
    index = json.loads(handle.read(length))
    index.pop("__metadata__", None)
    start = 8 + length
    specs, places = {}, {}
    for key, entry in index.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise PeftConfigError(
                f"{str(path)!r}: tensor {key!r} has dtype {entry['dtype']}, which merging does not read"
            )
        specs[key] = TensorSpec(SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
        places[key] = entry["data_offsets"]

    def read(key: str) -> torch.Tensor:
        begin, end = places[key]
        handle.seek(start + begin)
        return read_exactly(handle, end - begin, specs[key].dtype).reshape(specs[key].shape)

    return TensorSource(str(path), list(specs), specs.__getitem__, read)


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor of a torch file lives: its storage's record and dtype, offset, size, stride."""

    record: str
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class IndexUnpickler(pickle.Unpickler):
    """Unpickles a torch file's ``data.pkl`` into its structure with ``StoredTensor`` leaves (a
    storage type such as ``torch.FloatStorage`` is read as its dtype)."""

    REBUILDS = ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in self.REBUILDS:
            return getattr(self, name)
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(
            f"{module}.{name} is not part of a state dict of tensors; merging reads model files only"
        )

    def persistent_load(self, saved_id: Any) -> tuple[str, torch.dtype]:
        kind, dtype, key, _location, _numel = saved_id
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent record {kind!r}")
        return key, dtype

    @staticmethod
    def _rebuild_tensor_v2(
        storage: tuple[str, torch.dtype], offset: int, size, stride, *_: Any
    ) -> StoredTensor:
        return StoredTensor(storage[0], storage[1], offset, tuple(size), tuple(stride))

    @staticmethod
    def _rebuild_tensor_v3(storage, offset, size, stride, _grad, _hooks, dtype, *_: Any) -> StoredTensor:
        return StoredTensor(storage[0], dtype, offset, tuple(size), tuple(stride))

    @staticmethod
    def _rebuild_parameter(data: StoredTensor, *_: Any) -> StoredTensor:
        return data


def torch_file_source(path: Path) -> TensorSource:
    """A torch zip file (``torch.save``): the index from ``data.pkl``, each storage from ``data/<key>``."""
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    prefix = next(name for name in names if name.endswith("/data.pkl"))[: -len("data.pkl")]
    if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").decode() != "little":
        raise PeftConfigError(
            f"{str(path)!r} was written on a big-endian machine; load and save it again here"
        )
    state = IndexUnpickler(archive.open(f"{prefix}data.pkl")).load()
    for wrapper in ("module", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(value, StoredTensor) for value in state.values()):
        raise PeftConfigError(f"{str(path)!r} does not hold a state dict of tensors")
    specs = {key: TensorSpec(value.dtype, value.size) for key, value in state.items()}

    raw = path.open("rb")

    def read(key: str) -> torch.Tensor:
        stored = state[key]
        info = archive.getinfo(f"{prefix}data/{stored.record}")
        if info.compress_type == zipfile.ZIP_STORED:
            raw.seek(stored_data_offset(raw, info))
            flat = read_exactly(raw, info.file_size, stored.dtype)
        else:
            with archive.open(info) as handle:
                flat = read_exactly(handle, info.file_size, stored.dtype)
        tensor = flat.as_strided(stored.size, stored.stride, stored.offset)
        return tensor if tensor.numel() == flat.numel() else tensor.clone()

    return TensorSource(str(path), list(specs), specs.__getitem__, read)


def stored_data_offset(handle: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Where the bytes of an uncompressed zip member start: after its local header (30 bytes, the
    name and the extra field, whose lengths the local header gives)."""
    handle.seek(info.header_offset + 26)
    name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length
