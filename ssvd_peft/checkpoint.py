"""Adapter-only checkpoints, bound to the base model they were trained on.

One file holds the method, its config, the adapter's tensors (``<module>.<name>``: its
parameters and persistent buffers, such as PiSSA's initial factors A0, B0, which define its
residual weight on reload), optional full tensors of ``modules_to_save``, a model-level HDMoLE
domain router: a model part, ``model_part.<param>`` with its ``extra_state``), a fingerprint
of every adapted base weight (see ``weight_fingerprint``) and a SHA-256 checksum of all of that.
``load_adapter`` checks the checksum and the fingerprints against the model it is given BEFORE
changing it, then injects the config (and restores the model part) and loads the tensors through
``load_state_dict`` (so an adapter that rewrote the base weight rebuilds it from the loaded
state); a damaged file, or a checkpoint of another base model, is refused with a message that
names the problem.

Files are written atomically (temporary file, then rename) and read with
``torch.load(weights_only=True)``: no arbitrary object is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssvd_peft.budget import InjectionReport
from ssvd_peft.config import config_from_dict
from ssvd_peft.inject import (
    delete_adapter,
    inject_adapters,
    iter_adapter_layers,
)
from ssvd_peft.layers.base import ADAPTERS_ATTR, DEFAULT_ADAPTER, AdapterLinear, weight_fingerprint
from ssvd_peft.model_parts import model_part
from ssvd_peft.registry import get_method

FORMAT = "ssvd-peft-adapter"
VERSION = 2
MODEL_PART_KEY = "model_part"
FINGERPRINT_RTOL = 1e-4


class AdapterCheckpointError(ValueError):
    """An adapter checkpoint that cannot be used here; the message says why and what to do."""


def adapter_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` (parameters and persistent buffers), keyed
    ``<module name>.<tensor name>``; the adapter's model part (HDMoLE's domain router) under
    ``model_part.``."""
    state = {
        key: entry.tensor.detach().cpu().clone()
        for key, entry in _adapter_entries(model, adapter_name).items()
    }
    if not state:
        raise AdapterCheckpointError(f"the model has no adapter named {adapter_name!r}")
    return state


def save_adapter(
    model: nn.Module,
    path: str | Path,
    adapter_name: str = DEFAULT_ADAPTER,
    modules_to_save: list[str] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` (and the full ``modules_to_save``) to ``path``."""
    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise AdapterCheckpointError(
            f"the model has no adapter named {adapter_name!r} (it has {sorted(configs)}); "
            "inject one with inject_adapters first"
        )
    config = configs[adapter_name]
    modules_to_save = list(modules_to_save or [])
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "method": config.method,
        "config": json.dumps(config.to_dict()),
        "tensors": adapter_state_dict(model, adapter_name),
        "fingerprints": {
            name: layer.base_fingerprint.clone()
            for name, layer in iter_adapter_layers(model)
            if adapter_name in layer.peft_adapters
        },
        "modules_to_save": {name: _module_tensors(model, name) for name in modules_to_save},
    }
    part = model_part(model, adapter_name)
    if part is not None:
        payload[MODEL_PART_KEY] = part.extra_state()
    payload["checksum"] = payload_checksum(payload)
    return _atomic_save(payload, Path(path))


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = DEFAULT_ADAPTER) -> InjectionReport:
    """Inject the adapter stored at ``path`` into ``model`` (its base model) and load its tensors."""
    payload = read_adapter_file(path)
    check_base_model(model, payload["fingerprints"], path)
    config = config_from_dict(payload["method"], json.loads(payload["config"]))
    report = inject_adapters(model, config, adapter_name)
    try:
        _restore_model_part(model, payload, adapter_name)
        _load_tensors(model, payload["tensors"], adapter_name, path)
        for name, tensors in payload["modules_to_save"].items():
            _load_module_tensors(model, name, tensors, path)
    except AdapterCheckpointError:
        delete_adapter(model, adapter_name)
        raise
    return report


def read_adapter_file(path: str | Path) -> dict[str, Any]:
    """The checked contents of an adapter file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterCheckpointError(f"adapter checkpoint {str(path)!r} does not exist; check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise AdapterCheckpointError(
            f"{str(path)!r} is not a readable adapter checkpoint ({type(error).__name__}: {error}); "
            "write one with ssvd_peft.checkpoint.save_adapter"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AdapterCheckpointError(
            f"{str(path)!r} is not an ssvd-peft adapter checkpoint (no '{FORMAT}' header); "
            "a full model state dict loads with model.load_state_dict instead"
        )
    if payload.get("version") != VERSION:
        raise AdapterCheckpointError(
            f"{str(path)!r} has format version {payload.get('version')}; "
            f"this ssvd-peft reads version {VERSION}"
        )
    if payload.get("checksum") != payload_checksum(payload):
        raise AdapterCheckpointError(
            f"{str(path)!r} is damaged: its contents do not match the SHA-256 checksum written with "
            "them (a changed byte, a truncated copy or an edit); copy the file again from where it "
            "was saved, or save the adapter again"
        )
    return payload


def payload_checksum(payload: dict[str, Any]) -> str:
    """SHA-256 over everything an adapter file holds but the checksum: the header fields, and
    every tensor's name, dtype, shape and bytes, in sorted order."""
    digest = hashlib.sha256()
    for field in ("format", "version", "method", "config", MODEL_PART_KEY):
        digest.update(f"{field}={json.dumps(payload.get(field), sort_keys=True)};".encode())
    for section in ("tensors", "fingerprints", "modules_to_save"):
        for key, tensor in sorted(_flat_tensors(payload.get(section, {}), section)):
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _flat_tensors(values: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(values, torch.Tensor):
        return [(prefix, values)]
    if not isinstance(values, dict):
        raise AdapterCheckpointError(f"adapter file entry {prefix!r} is neither a tensor nor a mapping")
    return [pair for key, value in values.items() for pair in _flat_tensors(value, f"{prefix}/{key}")]


def check_base_model(model: nn.Module, fingerprints: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse a checkpoint whose adapted base weights differ from ``model``'s."""
    modules = dict(model.named_modules())
    for name, expected in fingerprints.items():
        module = modules.get(name)
        if module is None:
            raise AdapterCheckpointError(
                f"adapter {str(path)!r} adapts module {name!r}, which this model does not have: "
                "it was trained on another base model; load it into the model it was trained on"
            )
        actual = module.base_fingerprint if isinstance(module, AdapterLinear) else _fingerprint(module)
        expected = expected.to(torch.float64)
        if actual is None or not torch.allclose(actual, expected, rtol=FINGERPRINT_RTOL, atol=1e-6):
            raise AdapterCheckpointError(
                f"adapter {str(path)!r} was trained on another base model: the weight of {name!r} "
                "differs from the one it was trained on. Load the same pretrained checkpoint "
                "before loading the adapter"
            )


def _fingerprint(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return weight_fingerprint(weight) if isinstance(weight, torch.Tensor) else None


@dataclass(frozen=True)
class _Entry:
    """One tensor of an adapter: its name in the model's state dict, and the tensor itself."""

    state_name: str
    tensor: torch.Tensor


def _adapter_entries(model: nn.Module, adapter_name: str) -> dict[str, _Entry]:
    """{file key: entry} of adapter ``adapter_name``'s parameters and persistent buffers: file keys
    ``<module>.<tensor>`` for the layers, ``model_part.<tensor>`` for a model part."""
    entries: dict[str, _Entry] = {}
    for module_name, layer in iter_adapter_layers(model):
        if adapter_name in layer.peft_adapters:
            prefix = f"{module_name}.{ADAPTERS_ATTR}.{adapter_name}."
            state = layer.peft_adapters[adapter_name].state_dict(keep_vars=True)
            entries.update({f"{module_name}.{key}": _Entry(prefix + key, t) for key, t in state.items()})
    part = model_part(model, adapter_name)
    if part is not None:
        prefix = f"{ADAPTERS_ATTR}.{adapter_name}."
        state = part.state_dict(keep_vars=True)
        entries.update({f"{MODEL_PART_KEY}.{key}": _Entry(prefix + key, t) for key, t in state.items()})
    return entries


def _restore_model_part(model: nn.Module, payload: dict[str, Any], adapter_name: str) -> None:
    """Attach the model-level part a file describes, unless its config attached one at injection."""
    if MODEL_PART_KEY in payload and model_part(model, adapter_name) is None:
        get_method(payload["method"]).model_part.restore(model, adapter_name, payload[MODEL_PART_KEY])


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str, path: Any) -> None:
    """Load the file's adapter tensors through ``load_state_dict`` (hooks included) after checking
    that they are exactly the adapter's, with its shapes."""
    entries = _adapter_entries(model, adapter_name)
    missing = sorted(set(entries) - set(tensors))
    unexpected = sorted(set(tensors) - set(entries))
    if missing or unexpected:
        raise AdapterCheckpointError(
            f"adapter {str(path)!r} does not fit its own config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; the file is damaged or was edited"
        )
    for key, entry in entries.items():
        if tensors[key].shape != entry.tensor.shape:
            raise AdapterCheckpointError(
                f"adapter {str(path)!r}: {key} has shape {tuple(tensors[key].shape)}, "
                f"the model expects {tuple(entry.tensor.shape)}"
            )
    model.load_state_dict({entry.state_name: tensors[key] for key, entry in entries.items()}, strict=False)


def _module_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    state = model.get_submodule(name).state_dict()
    return {key: value.detach().cpu().clone() for key, value in state.items()}


def _load_module_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Any) -> None:
    try:
        model.get_submodule(name).load_state_dict(tensors)
    except (AttributeError, RuntimeError) as error:
        raise AdapterCheckpointError(
            f"adapter {str(path)!r}: cannot load saved module {name!r} into this model ({error})"
        ) from None


def _atomic_save(payload: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
