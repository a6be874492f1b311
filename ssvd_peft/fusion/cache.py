"""Taps kept on disk across epochs: one file per utterance, found again by the content of its input.

The encoder is frozen, so an utterance's taps are the same every epoch; computing them once saves
the whole encoder forward from the second epoch on. No utterance ids are needed: the key is a hash
of the utterance's input itself (its valid frames, shape and dtype), mixed with a ``context`` that
names the encoder and the tap set, so another checkpoint or tap list reads none of the old entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.files import atomic_write

SUFFIX = ".safetensors"


class TapCache:
    """Per-utterance taps on disk, bounded by ``max_bytes``.

    Each utterance is one safetensors file ``<key>.safetensors`` holding a tensor ``H<l>`` of shape
    (T_out, dim) for every tap l: unpadded (its out length is T_out) and in the dtype the encoder
    produced, so a cached tap is bit for bit the tap computed when it was stored (computing it again in
    a batch padded to another length may differ in the last bits). Files are written atomically (a
    temporary file, then a rename). An in-memory index of the files and their sizes is read from the
    directory at start and kept up to date; the files together never exceed ``max_bytes``: once an
    utterance would not fit, nothing more is added and the remaining utterances are computed every
    time. The index is this process's: give each process its own directory (several processes
    sharing one may together exceed the budget).

    Only valid for a deterministic frozen front: nothing random (SpecAugment, dropout) may act on
    the input or inside the encoder before the taps. ``TappedEncoder`` keeps its frozen part in eval
    mode and refuses a cache when that part has trainable parameters; augmentation applied to the
    input before the encoder must be switched off by the caller (an augmented input would only
    miss the cache, but then fill it with one-off entries).
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        if not (isinstance(max_bytes, int) and max_bytes > 0):
            raise PeftConfigError(f"tap cache: max_bytes must be a positive integer, got {max_bytes!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.index = {path.name[: -len(SUFFIX)]: path.stat().st_size for path in self.files()}
        self.size_bytes = sum(self.index.values())
        self.full = False

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    @staticmethod
    def key(utterance: torch.Tensor, context: bytes = b"") -> str:
        """blake2b of ``context``, the utterance's dtype and shape, and its bytes (its valid frames only:
        pass the input cut to its length)."""
        digest = hashlib.blake2b(context, digest_size=20)
        digest.update(f"{utterance.dtype}{tuple(utterance.shape)}".encode())
        digest.update(utterance.detach().cpu().contiguous().view(torch.uint8).numpy())
        return digest.hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def load(self, key: str) -> dict[int, torch.Tensor] | None:
        """The stored taps {l: H_l (T_out, dim)} of ``key``, on the CPU; None when not stored."""
        if key not in self.index:
            return None
        return {int(name[1:]): tap for name, tap in load_file(self.path(key)).items()}

    def store(self, key: str, taps: Mapping[int, torch.Tensor]) -> bool:
        """Write the unpadded taps {l: H_l (T_out, dim)} of one utterance; False when the budget is
        reached (then nothing more is stored)."""
        if key in self.index:
            return True
        if self.full:
            return False
        data = save({f"H{tap}": value.detach().cpu().contiguous() for tap, value in taps.items()})
        if self.size_bytes + len(data) > self.max_bytes:
            self.full = True
            return False
        atomic_write(self.path(key), lambda temporary: Path(temporary).write_bytes(data))
        self.index[key] = len(data)
        self.size_bytes += len(data)
        return True
