"""Parts of an adapter that live on the model rather than on one layer (HDMoLE's domain router).

A method whose registry entry names a ``model_part`` class gets three calls from generic code:

    part_class.on_injected(model, adapter_name, config)   # after injection: set up, maybe attach
    part.extra_state()                                     # saved with the adapter (JSON-able)
    part_class.restore(model, adapter_name, extra_state)   # attach again when a file is loaded

and ``detach`` when the adapter is deleted or unloaded. An attached part sits at
``model.peft_adapters[<adapter name>]``, so its parameters are adapter parameters
(``peft_adapters.<adapter name>.``): freezing, adapter-only state dicts and saving keep them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ssvd_peft.layers.base import ADAPTERS_ATTR

if TYPE_CHECKING:
    from ssvd_peft.config import AdapterConfig


class ModelPart(nn.Module):
    """The model-level part of one adapter."""

    @classmethod
    def on_injected(cls, model: nn.Module, adapter_name: str, config: AdapterConfig) -> None:
        """Set up the model after adapter ``adapter_name`` was injected with ``config`` (attach a
        part if the config asks for one)."""

    @classmethod
    def restore(cls, model: nn.Module, adapter_name: str, extra_state: dict[str, Any]) -> ModelPart:
        """Attach the part that ``extra_state`` (from ``extra_state()``) describes."""
        raise NotImplementedError(f"{cls.__name__} cannot be restored")

    def extra_state(self) -> dict[str, Any]:
        """What besides its tensors rebuilds this part (JSON-able)."""
        return {}

    def detach(self, model: nn.Module) -> None:
        """Undo what attaching did to the model besides adding the part (hooks, shared state)."""


def model_part(model: nn.Module, adapter_name: str) -> ModelPart | None:
    """The model-level part of adapter ``adapter_name``, if one is attached."""
    container = getattr(model, ADAPTERS_ATTR, None)
    if not isinstance(container, nn.ModuleDict) or adapter_name not in container:
        return None
    part = container[adapter_name]
    return part if isinstance(part, ModelPart) else None


def add_model_part(model: nn.Module, adapter_name: str, part: ModelPart) -> ModelPart:
    """Put ``part`` at ``model.peft_adapters[adapter_name]``."""
    if isinstance(model, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        raise TypeError(
            f"a model-level adapter part becomes a submodule of the model, and a {type(model).__name__} "
            "would run or list it as one of its own layers; wrap the container in an nn.Module"
        )
    container = getattr(model, ADAPTERS_ATTR, None)
    if container is None:
        container = nn.ModuleDict()
        setattr(model, ADAPTERS_ATTR, container)
    if not isinstance(container, nn.ModuleDict) or adapter_name in container:
        raise ValueError(
            f"the model already has {ADAPTERS_ATTR}.{adapter_name} (or a {ADAPTERS_ATTR} attribute of "
            "its own); detach the existing part first"
        )
    container[adapter_name] = part
    return part


def detach_model_parts(model: nn.Module, adapter_name: str | None = None) -> None:
    """Detach the part of ``adapter_name`` (every part if None); drop the container once empty."""
    container = getattr(model, ADAPTERS_ATTR, None)
    if not isinstance(container, nn.ModuleDict):
        return
    for name in list(container) if adapter_name is None else [adapter_name]:
        part = model_part(model, name)
        if part is not None:
            part.detach(model)
            del container[name]
    if not len(container):
        delattr(model, ADAPTERS_ATTR)
