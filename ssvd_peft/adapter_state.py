"""The adapter's entries of a model's state dict: the one layout every adapter file holds.

    <layer>.peft_adapters.<name>.<tensor>   the adapter's parameters and persistent buffers
    peft_adapters.<name>.<tensor>           its model part (HDMoLE's domain router), if any
    <module>.<tensor>                       the full tensors of modules_to_save
    <layer>.base_fingerprint                a float64 signature of each adapted base weight

``adapter_entries`` selects them from a model (what ``save_adapter`` writes and what ESPnet's
trainer writes with ``peft_save: adapter``); ``check_adapter_entries`` refuses, before anything
changes, a state dict that lacks entries, has unknown ones or other shapes, or was trained on
another base model; ``load_adapter_entries`` checks and loads through ``load_state_dict`` (so an
adapter that rewrote the base weight rebuilds it from the loaded state).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.layers.base import ADAPTERS_ATTR, AdapterLinear, is_adapter_parameter, weight_fingerprint
from ssvd_peft.targets import matches_any

FINGERPRINT = "base_fingerprint"
BASE_LAYER = "base_layer"
FINGERPRINT_RTOL = 1e-4


class AdapterCheckpointError(PeftConfigError):
    """An adapter checkpoint that cannot be used here; the message says why and what to do."""


def is_adapter_entry(name: str, modules_to_save: list[str], adapter_name: str | None = None) -> bool:
    """True for the tensors of adapter ``adapter_name`` (any adapter if None) and for tensors of a
    module in ``modules_to_save``."""
    if is_adapter_parameter(name, adapter_name):
        return True
    parts = name.split(".")[:-1]
    return any(matches_any(modules_to_save, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def adapter_fingerprints(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """``<layer>.base_fingerprint`` of every layer that has adapter ``adapter_name`` (any if None)."""
    return {
        f"{name}.{FINGERPRINT}": module.base_fingerprint.clone()
        for name, module in model.named_modules()
        if isinstance(module, AdapterLinear)
        and (adapter_name is None or adapter_name in module.peft_adapters)
    }


def select_adapter_entries(
    state: dict[str, Any], modules_to_save: list[str], adapter_name: str | None = None
) -> dict[str, Any]:
    """The adapter entries of a model's state dict (fingerprints not included)."""
    return {
        key: value for key, value in state.items() if is_adapter_entry(key, modules_to_save, adapter_name)
    }


def adapter_entries(
    model: nn.Module, adapter_name: str, modules_to_save: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s entries of ``model`` (the layout above), detached CPU copies."""
    state = select_adapter_entries(model.state_dict(), list(modules_to_save or []), adapter_name)
    state.update(adapter_fingerprints(model, adapter_name))
    return {key: value.detach().cpu().clone() for key, value in state.items()}


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a state dict of ``model`` can hold, by its state-dict name (an adapted layer's
    base tensors under their original names), whatever a state-dict hook leaves out."""
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


def without_empty_leftovers(state: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """``state`` without empty tensors the model does not have: files written before version 2
    (0a51e59) stored SSVD rotations of size 0 as empty parameters, which no model registers now."""
    known = state_tensors(model)
    return {
        key: value
        for key, value in state.items()
        if key in known or not (isinstance(value, torch.Tensor) and value.numel() == 0)
    }


def split_fingerprints(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the state without fingerprints, {layer name: fingerprint})."""
    suffix = f".{FINGERPRINT}"
    fingerprints = {key[: -len(suffix)]: value for key, value in state.items() if key.endswith(suffix)}
    return {key: value for key, value in state.items() if not key.endswith(suffix)}, fingerprints


def renamed_adapter(state: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """``state`` with the entries of adapter ``old`` under adapter ``new``."""
    if old == new:
        return dict(state)
    marker, replacement = f"{ADAPTERS_ATTR}.{old}.", f"{ADAPTERS_ATTR}.{new}."
    return {
        (key.replace(marker, replacement, 1) if key.startswith(marker) or f".{marker}" in key else key): value
        for key, value in state.items()
    }


def check_base_model(model: nn.Module, fingerprints: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a checkpoint whose adapted base weights differ from ``model``'s."""
    modules = dict(model.named_modules())
    for name, expected in fingerprints.items():
        module = modules.get(name)
        if module is None:
            raise AdapterCheckpointError(
                f"adapter {source!r} adapts module {name!r}, which this model does not have: "
                "it was trained on another base model; load it into the model it was trained on"
            )
        weight = getattr(module, "weight", None)
        if isinstance(module, AdapterLinear):
            actual = module.base_fingerprint
        else:
            actual = weight_fingerprint(weight) if isinstance(weight, torch.Tensor) else None
        expected = expected.to(torch.float64)
        if actual is None or not torch.allclose(actual, expected, rtol=FINGERPRINT_RTOL, atol=1e-6):
            raise AdapterCheckpointError(
                f"adapter {source!r} was trained on another base model: the weight of {name!r} "
                "differs from the one it was trained on. Load the same pretrained checkpoint "
                "before loading the adapter"
            )


def check_adapter_entries(
    model: nn.Module,
    state: Mapping[str, Any],
    modules_to_save: list[str],
    source: str,
    fix: str = "Use the config it was trained with",
    adapter_name: str | None = None,
) -> None:
    """Refuse, without changing ``model``, an adapter-only (or full) state dict that lacks entries of
    adapter ``adapter_name`` (of any adapter if None), has entries the model does not, or entries of
    other shapes (the message ends with ``fix``), or was trained on another base model."""
    state, fingerprints = split_fingerprints(without_empty_leftovers(state, model))
    if fingerprints:
        check_base_model(model, fingerprints, source)
    expected = state_tensors(model)
    required = {name for name in expected if is_adapter_entry(name, modules_to_save, adapter_name)}
    missing = sorted(required - set(state))
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
    model: nn.Module,
    state: Mapping[str, Any],
    modules_to_save: list[str],
    source: str,
    adapter_name: str | None = None,
) -> None:
    """Check (``check_adapter_entries``) and load an adapter-only (or full) state dict into ``model``,
    which has its base weights and adapters."""
    check_adapter_entries(model, state, modules_to_save, source, adapter_name=adapter_name)
    model.load_state_dict(split_fingerprints(without_empty_leftovers(state, model))[0], strict=False)
