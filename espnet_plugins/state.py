"""Adapter-only model files in ESPnet's own format: a flat state dict.

ESPnet's trainer saves ``model.state_dict()`` as ``Nepoch.pth`` (and links ``*.best.pth``,
averages n-best files, stores it in ``checkpoint.pth``). With ``keep_adapter_entries`` the
state dict of a model that has adapters holds only

    <layer>.peft_adapters.<name>.<tensor>   the adapters' parameters and persistent buffers,
    <module>.<tensor>                       the full tensors of modules_to_save,
    <layer>.base_fingerprint                a signature of each adapted base weight,

so every ESPnet tool keeps working on files a small fraction of the model's size. A model
without adapters (after ``merge_and_unload``) gives its full state dict again.
``load_adapter_entries`` loads such a file (or a full one) into the rebuilt base model with
adapters, refusing a file that lacks adapter tensors or was trained on another base model.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ssvd_peft.checkpoint import AdapterCheckpointError, check_base_model
from ssvd_peft.inject import is_adapter_parameter, iter_adapter_layers
from ssvd_peft.targets import matches_any

FINGERPRINT = "base_fingerprint"


def keep_adapter_entries(model: nn.Module, modules_to_save: list[str]) -> RemovableHandle:
    """Make ``model.state_dict()`` hold only the adapter entries while the model has adapters."""
    return model.register_state_dict_post_hook(
        partial(_adapter_entries_only, modules_to_save=modules_to_save)
    )


def is_adapter_entry(name: str, modules_to_save: list[str]) -> bool:
    """True for adapter tensors and for tensors of a module in ``modules_to_save``."""
    if is_adapter_parameter(name):
        return True
    parts = name.split(".")[:-1]
    return any(matches_any(modules_to_save, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def adapter_entry_names(model: nn.Module, modules_to_save: list[str]) -> set[str]:
    """State-dict names of the adapter entries of ``model`` (parameters and persistent buffers)."""
    names = {name for name, _ in model.named_parameters() if is_adapter_entry(name, modules_to_save)}
    for module_name, module in model.named_modules():
        for buffer_name in module._buffers:
            if buffer_name in module._non_persistent_buffers_set:
                continue
            name = f"{module_name}.{buffer_name}" if module_name else buffer_name
            if is_adapter_entry(name, modules_to_save):
                names.add(name)
    return names


def load_adapter_entries(
    model: nn.Module, state: Mapping[str, Any], modules_to_save: list[str], source: str
) -> None:
    """Load an adapter-only (or full) state dict into ``model``, which has its base weights and adapters."""
    state = dict(state)
    fingerprints = {
        key[: -len(FINGERPRINT) - 1]: state.pop(key) for key in list(state) if key.endswith(f".{FINGERPRINT}")
    }
    if fingerprints:
        check_base_model(model, fingerprints, source)
    missing = sorted(adapter_entry_names(model, modules_to_save) - set(state))
    result = model.load_state_dict(state, strict=False)
    if missing or result.unexpected_keys:
        raise AdapterCheckpointError(
            f"{source!r} does not fit this model with its adapters: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {result.unexpected_keys[:5]} "
            f"({len(result.unexpected_keys)} in all). Use the config.yaml it was trained with"
        )


def _adapter_entries_only(
    model: nn.Module, state_dict: dict[str, Any], prefix: str, _metadata: Any, modules_to_save: list[str]
) -> None:
    layers = list(iter_adapter_layers(model))
    if not layers:
        return
    for key in list(state_dict):
        if key.startswith(prefix) and not is_adapter_entry(key[len(prefix) :], modules_to_save):
            del state_dict[key]
    for name, layer in layers:
        state_dict[f"{prefix}{name}.{FINGERPRINT}"] = layer.base_fingerprint.clone()
