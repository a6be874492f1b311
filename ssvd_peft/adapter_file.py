"""Adapter files: the entries of ``ssvd_peft.adapter_state``'s layout plus what rebuilds the adapter.

One layout, two containers:

- written by ``save_adapter``: a safetensors file whose header holds the format and version, the
  method, its config (JSON), the adapter name its entries carry, ``modules_to_save``, the model
  part's extra state and a SHA-256 checksum of all of it (tensors included). Read without
  unpickling anything.
- written by ESPnet training (``peft_save: adapter``): ESPnet's own model file, a flat state dict
  of the same entries (``*.pth``, read with ``weights_only=True``); the method and config come from
  the ``config.yaml`` of the experiment (next to the file, or given). ESPnet averages such files
  tensor by tensor, so they carry no checksum.

Files of format versions 1 and 2 (a pickled dict with ``tensors``, ``fingerprints`` and
``modules_to_save`` sections) are read too (``ssvd-peft convert`` rewrites them); a PiSSA file of
version 1 lacks its initial factors and is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ssvd_peft.adapter_state import FINGERPRINT, AdapterCheckpointError, split_fingerprints
from ssvd_peft.files import atomic_write, is_torch_zip
from ssvd_peft.layers.base import ADAPTERS_ATTR, DEFAULT_ADAPTER

FORMAT = "ssvd-peft-adapter"
VERSION = 3
HEADER_FIELDS = ("format", "version", "method", "config", "adapter_name", "modules_to_save", "model_part")
CONVERT_HINT = "rewrite it in the current format with `ssvd-peft convert OLD NEW.safetensors`"


@dataclass
class AdapterFile:
    """What an adapter file holds: the method and its config (``to_dict()``), the adapter name its
    entries carry, ``modules_to_save``, the entries (fingerprints included) and the model part's
    extra state (or None)."""

    method: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    adapter_name: str = DEFAULT_ADAPTER
    modules_to_save: list[str] = field(default_factory=list)
    model_part: dict[str, Any] | None = None

    @property
    def fingerprints(self) -> dict[str, torch.Tensor]:
        """{adapted layer: fingerprint (rows, cols, ...)}."""
        return split_fingerprints(self.tensors)[1]

    def header(self) -> dict[str, str]:
        """The safetensors header: every field as a string (JSON where it is not one)."""
        values = {
            "format": FORMAT,
            "version": str(VERSION),
            "method": self.method,
            "config": json.dumps(self.config, sort_keys=True),
            "adapter_name": self.adapter_name,
            "modules_to_save": json.dumps(self.modules_to_save),
            "model_part": json.dumps(self.model_part, sort_keys=True),
        }
        return {**values, "checksum": checksum(values, self.tensors)}


def checksum(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the header fields and every tensor's name, dtype, shape and bytes, sorted."""
    digest = hashlib.sha256()
    for name in HEADER_FIELDS:
        digest.update(f"{name}={header.get(name)};".encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_adapter_file(adapter: AdapterFile, path: str | Path) -> Path:
    """Write ``adapter`` as a safetensors file, atomically (a temporary file, then a rename)."""
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in adapter.tensors.items()}
    return atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=adapter.header()))


def read_adapter_file(path: str | Path, config_file: str | Path | None = None) -> AdapterFile:
    """The checked contents of an adapter file of any supported container (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterCheckpointError(f"adapter file {str(path)!r} does not exist; check the path")
    if not is_torch_zip(path):
        return _read_safetensors(path)
    payload = _torch_load(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return _from_pickled_format(payload, path)
    return _from_espnet_model_file(payload, path, config_file)


def _read_safetensors(path: Path) -> AdapterFile:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterCheckpointError(
            f"{str(path)!r} is not a readable adapter file ({type(error).__name__}: {error}); it is "
            "damaged or not an adapter: write one with ssvd_peft.checkpoint.save_adapter"
        ) from None
    if header.get("format") != FORMAT:
        raise AdapterCheckpointError(
            f"{str(path)!r} is a safetensors file but not an ssvd-peft adapter (no '{FORMAT}' header)"
        )
    if header.get("version") != str(VERSION):
        raise AdapterCheckpointError(
            f"{str(path)!r} has format version {header.get('version')}; "
            f"this ssvd-peft reads version {VERSION}"
        )
    if header.get("checksum") != checksum(header, tensors):
        raise AdapterCheckpointError(
            f"{str(path)!r} is damaged: its contents do not match the SHA-256 checksum written with "
            "them (a changed byte, a truncated copy or an edit); copy the file again from where it "
            "was saved, or save the adapter again"
        )
    return AdapterFile(
        method=header["method"],
        config=json.loads(header["config"]),
        tensors=tensors,
        adapter_name=header["adapter_name"],
        modules_to_save=json.loads(header["modules_to_save"]),
        model_part=json.loads(header["model_part"]),
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).splitlines()[0] if str(error) else "no details"
        raise AdapterCheckpointError(
            f"{str(path)!r} is not a readable adapter file ({type(error).__name__}: {first_line}); it is "
            "damaged or not an adapter: write one with ssvd_peft.checkpoint.save_adapter"
        ) from None


def _from_espnet_model_file(payload: Any, path: Path, config_file: str | Path | None) -> AdapterFile:
    """An ESPnet model file (flat state dict) and the peft block of its experiment's config.yaml."""
    state = payload.get("module", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterCheckpointError(
            f"{str(path)!r} is neither an ssvd-peft adapter file nor an ESPnet model file (a state dict)"
        )
    config_path = Path(config_file) if config_file is not None else path.parent / "config.yaml"
    if not config_path.is_file():
        raise AdapterCheckpointError(
            f"{str(path)!r} is an ESPnet model file; its method and options are in the experiment's "
            f"config.yaml, which is not at {str(config_path)!r}: give it (config=...)"
        )
    experiment = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    if not experiment.get("peft"):
        raise AdapterCheckpointError(
            f"{str(config_path)!r} has no peft block: {str(path)!r} was not trained with an adapter"
        )
    return AdapterFile(
        method=experiment["peft"],
        config=dict(experiment.get("peft_conf") or {}),
        tensors=dict(state),
        adapter_name=experiment.get("peft_adapter_name") or DEFAULT_ADAPTER,
        modules_to_save=list(experiment.get("peft_modules_to_save") or []),
    )


def _from_pickled_format(payload: dict[str, Any], path: Path) -> AdapterFile:
    """A file of format 1 or 2: sections by layer, in the current layout."""
    version = payload.get("version")
    if version not in (1, 2):
        raise AdapterCheckpointError(
            f"{str(path)!r} has format version {version}; this ssvd-peft reads version {VERSION} (and 1, 2)"
        )
    if payload["method"] == "pissa" and version == 1:
        raise AdapterCheckpointError(
            f"{str(path)!r} is a PiSSA adapter of format 1, which lacks the initial factors A0, B0 that "
            "define its residual weight; load it with the ssvd-peft that wrote it and save it again"
        )
    layers = sorted(payload["fingerprints"], key=len, reverse=True)
    prefix = f"{ADAPTERS_ATTR}.{DEFAULT_ADAPTER}"
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in payload["tensors"].items():
        if tensor.numel() == 0:
            continue  # format 1 stored rotations of size 0 as empty parameters
        layer = next((name for name in layers if key.startswith(f"{name}.")), None)
        if layer is not None:
            tensors[f"{layer}.{prefix}.{key[len(layer) + 1 :]}"] = tensor
        else:  # a model part: "peft_adapters.<name>.<tensor>" (1), "<section>.<tensor>" (2)
            tensors[f"{prefix}.{key.split('.', 2 if version == 1 else 1)[-1]}"] = tensor
    tensors.update({f"{layer}.{FINGERPRINT}": value for layer, value in payload["fingerprints"].items()})
    for module, state in payload["modules_to_save"].items():
        tensors.update({f"{module}.{key}": value for key, value in state.items()})
    part = payload.get("model_part") or payload.get("domain_router")
    if part is not None and "feature_dim" not in part:
        part = {**part, "feature_dim": int(tensors[f"{prefix}.proj.weight"].shape[1])}
    return AdapterFile(
        method=payload["method"],
        config=json.loads(payload["config"]),
        tensors=tensors,
        modules_to_save=list(payload["modules_to_save"]),
        model_part=part,
    )
