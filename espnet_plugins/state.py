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
adapters, refusing a file that lacks adapter tensors, has tensors of other shapes or was trained
on another base model (``check_adapter_entries`` runs the same checks without loading);
``read_model_file`` reads a model file with one clear error for a missing or unreadable one.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ssvd_peft.checkpoint import AdapterCheckpointError, check_base_model
from ssvd_peft.inject import iter_adapter_layers
from ssvd_peft.layers.base import is_adapter_parameter
from ssvd_peft.targets import matches_any

FINGERPRINT = "base_fingerprint"
BASE_LAYER = "base_layer"


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
    return {name for name in state_tensors(model) if is_adapter_entry(name, modules_to_save)}


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a state dict of ``model`` can hold, by its state-dict name (an adapted layer's
    base tensors under their original names), whatever ``keep_adapter_entries`` leaves out."""
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        persistent = {
            key: buffer
            for key, buffer in module._buffers.items()
            if key not in module._non_persistent_buffers_set
        }
        for key, tensor in {**module._parameters, **persistent}.items():
            if tensor is not None:
                tensors[f"{prefix}{key}".replace(f".{BASE_LAYER}.", ".")] = tensor
    return tensors


def read_model_file(path: str | Path, role: str, weights_only: bool = True) -> dict[str, Any]:
    """The contents of an ESPnet model file (its ``module`` entry for a wrapped one), or one error
    that names the file and its ``role`` (the option it came from) when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise AdapterCheckpointError(f"{role} {str(path)!r} does not exist; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        raise AdapterCheckpointError(
            f"{role} {str(path)!r} is not a readable model file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}); it is damaged (a failed "
            "copy or write) or not a file that ESPnet training wrote: give a *.pth of the experiment"
        ) from None
    if not isinstance(state, dict):
        raise AdapterCheckpointError(
            f"{role} {str(path)!r} holds a {type(state).__name__}, not a state dict; give a *.pth "
            "that ESPnet training wrote"
        )
    return state.get("module", state)


def check_adapter_entries(
    model: nn.Module,
    state: Mapping[str, Any],
    modules_to_save: list[str],
    source: str,
    fix: str = "Use the config.yaml it was trained with",
) -> None:
    """Refuse, without changing ``model``, an adapter-only (or full) state dict that lacks adapter
    entries, has entries the model does not, or entries of other shapes (the message ends with
    ``fix``), or was trained on another base model."""
    state = dict(state)
    fingerprints = {
        key[: -len(FINGERPRINT) - 1]: state.pop(key) for key in list(state) if key.endswith(f".{FINGERPRINT}")
    }
    if fingerprints:
        check_base_model(model, fingerprints, source)
    expected = state_tensors(model)
    missing = sorted(adapter_entry_names(model, modules_to_save) - set(state))
    unexpected = sorted(set(state) - set(expected))
    resized = sorted(
        f"{key} {tuple(state[key].shape)} (model: {tuple(expected[key].shape)})"
        for key in set(state) & set(expected)
        if getattr(state[key], "shape", None) != expected[key].shape
    )
    if missing or unexpected or resized:
        raise AdapterCheckpointError(
            f"{source!r} does not fit this model with its adapters: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all), "
            f"other shapes {resized[:3]} ({len(resized)} in all). {fix}"
        )


def load_adapter_entries(
    model: nn.Module, state: Mapping[str, Any], modules_to_save: list[str], source: str
) -> None:
    """Load an adapter-only (or full) state dict into ``model``, which has its base weights and adapters."""
    check_adapter_entries(model, state, modules_to_save, source)
    model.load_state_dict(
        {key: value for key, value in state.items() if not key.endswith(f".{FINGERPRINT}")}, strict=False
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
