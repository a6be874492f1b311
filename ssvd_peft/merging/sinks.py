"""Writing a state dict tensor by tensor, so a merged model never has to be in memory whole.

``write_state_dict(path, specs, tensors)`` writes ``(name, tensor)`` pairs as they come, in the
order of ``specs`` ({name: TensorSpec}), atomically (``ssvd_peft.files.atomic_write``):

- ``*.safetensors``: the index (computed from ``specs``) first, then every tensor's bytes;
- any other name: a torch zip file as ``torch.save`` writes it (``torch.load`` and ESPnet read it
  as any model file): every tensor's storage is written as a ``data/<key>`` record when it comes,
  the pickled index (``data.pkl``, an OrderedDict of tensor rebuilds) at the end.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ssvd_peft.files import atomic_write
from ssvd_peft.merging.sources import SAFETENSORS_DTYPES, TensorSpec

SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
STORAGE_ALIGNMENT = 64


def write_state_dict(
    path: str | Path, specs: dict[str, TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]
) -> Path:
    """Write the pairs of ``tensors`` (exactly the names of ``specs``, in order) to ``path``."""
    writer = write_safetensors if Path(path).suffix == ".safetensors" else write_torch_file
    return atomic_write(path, lambda temporary: writer(temporary, specs, tensors))


def checked(specs: dict[str, TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]):
    """The pairs, each checked against the next entry of ``specs``; all of them must come."""
    expected = iter(specs.items())
    for name, tensor in tensors:
        want, spec = next(expected, (None, None))
        if name != want or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"writing {name!r} {tensor.dtype} {tuple(tensor.shape)} where {want!r} {spec} was due"
            )
        tensor = tensor.detach().cpu().contiguous()
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.itemsize:
            tensor = tensor.clone()  # a view of part of a storage: write only its own elements
        yield name, tensor
    missing = next(expected, None)
    if missing is not None:
        raise ValueError(f"the tensors ended before {missing[0]!r}")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    path: str, specs: dict[str, TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]
) -> None:
    index, offset = {}, 0
    for name, spec in specs.items():
        size = spec.dtype.itemsize * int(torch.Size(spec.shape).numel())
        index[name] = {
            "dtype": SAFETENSORS_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(index, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for _, tensor in checked(specs, tensors):
            handle.write(tensor_bytes(tensor))


@dataclass(frozen=True)
class StorageRecord:
    """A storage written as record ``data/<key>``, as the index refers to it."""

    key: str
    dtype: torch.dtype
    numel: int


class TensorRecord:
    """Pickles as ``torch._utils._rebuild_tensor_v2`` of a ``StorageRecord``, as torch.save does."""

    def __init__(self, storage: StorageRecord, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.shape, self.stride = storage, shape, stride

    def __reduce__(self):
        rebuild = torch._utils._rebuild_tensor_v2
        return rebuild, (self.storage, 0, self.shape, self.stride, False, OrderedDict())


class IndexPickler(pickle.Pickler):
    def persistent_id(self, obj: object):
        if isinstance(obj, StorageRecord):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


def write_torch_file(
    path: str, specs: dict[str, TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]
) -> None:
    writer = torch._C.PyTorchFileWriter(path, True, STORAGE_ALIGNMENT)
    index: OrderedDict[str, TensorRecord] = OrderedDict()
    for number, (name, tensor) in enumerate(checked(specs, tensors)):
        storage = StorageRecord(str(number), tensor.dtype, tensor.numel())
        writer.write_record(
            f"data/{storage.key}", tensor.untyped_storage(), tensor.untyped_storage().nbytes()
        )
        index[name] = TensorRecord(storage, tuple(tensor.shape), tuple(tensor.stride()))
    buffer = io.BytesIO()
    IndexPickler(buffer, protocol=2).dump(index)
    data = buffer.getvalue()
    writer.write_record("data.pkl", data, len(data))
    writer.write_record(".format_version", "1", 1)
    writer.write_record(".storage_alignment", str(STORAGE_ALIGNMENT), len(str(STORAGE_ALIGNMENT)))
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    writer.write_end_of_file()
