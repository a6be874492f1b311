"""What a training forward keeps in memory for the backward pass, measured from autograd itself."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def saved_for_backward_bytes(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """Bytes of the distinct storages autograd saves during one forward ``model(*args, **kwargs)``,
    minus the model's parameters and buffers: the activation memory of a training step."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*args, **kwargs)
    return sum(saved.values())
