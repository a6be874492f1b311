"""What an adapter file is, in words: ``ssvd-peft info FILE``.

The method and the options that differ from its defaults, the adapter name, the targeted layers
with their shapes and closed-form trainable counts (the shapes come from the base fingerprints),
the model part and modules_to_save tensors, and a digest of the base weights it is bound to.
"""

from __future__ import annotations

import dataclasses
import hashlib

from ssvd_peft.adapter_file import AdapterFile
from ssvd_peft.adapter_state import split_fingerprints
from ssvd_peft.config import config_from_dict
from ssvd_peft.layers.base import ADAPTERS_ATTR


def default_of(field: dataclasses.Field) -> object:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def describe_adapter(adapter: AdapterFile, source: str) -> str:
    """The description ``ssvd-peft info`` prints (see the module docstring)."""
    config = config_from_dict(adapter.method, adapter.config)
    defaults = {field.name: default_of(field) for field in dataclasses.fields(config)}
    options = {key: value for key, value in config.to_dict().items() if defaults[key] != value}
    entries, fingerprints = split_fingerprints(adapter.tensors)
    lines = [
        f"adapter file {source}",
        f"method {adapter.method}, adapter name {adapter.adapter_name!r}",
        f"options {options}",
        f"{'layer':<56} {'in x out':>11} {'trainable':>10}",
    ]
    total = 0
    for name in sorted(fingerprints):
        rows, cols = (int(v) for v in fingerprints[name][:2].tolist())
        count = config.for_module(name).trainable_split(cols, rows).total
        total += count
        lines.append(f"{name:<56} {f'{cols}x{rows}':>11} {count:>10,}")
    part = sum(v.numel() for k, v in entries.items() if k.startswith(f"{ADAPTERS_ATTR}."))
    saved = sum(v.numel() for k, v in entries.items() if f"{ADAPTERS_ATTR}." not in k)
    lines.append(f"total: {len(fingerprints)} layers, {total:,} trainable parameters")
    if adapter.model_part is not None or part:
        lines.append(f"model part: {part:,} parameters {adapter.model_part or {}}")
    if adapter.modules_to_save:
        lines.append(f"modules_to_save {adapter.modules_to_save}: {saved:,} parameters")
    digest = hashlib.sha256()
    for name in sorted(fingerprints):
        digest.update(f"{name}:{[round(v, 6) for v in fingerprints[name].tolist()]};".encode())
    lines.append(f"base model: fingerprint {digest.hexdigest()[:16]} over {len(fingerprints)} layers")
    return "\n".join(lines)
