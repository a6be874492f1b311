"""Saving an adapter and loading it into the base model it was trained on.

    save_adapter(model, "exp/adapter.safetensors", modules_to_save=["ctc.ctc_lo"])
    load_adapter(fresh_base_model, "exp/adapter.safetensors")     # identical outputs
    load_adapter(fresh_base_model, "exp/asr_lora/valid.acc.best.pth")   # trained through ESPnet

``load_adapter`` reads any adapter file (``ssvd_peft.adapter_file``: files of ``save_adapter``,
ESPnet model files with their experiment's config.yaml, older formats), checks the fingerprints
against the model BEFORE changing it, injects the config (restoring a model part the config does
not attach), and loads the entries (``ssvd_peft.adapter_state``) under the adapter name asked
for. A damaged file, a file of another base model or one that does not fit its own config is
refused with a message that names the problem, and leaves the model as it was.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ssvd_peft.adapter_file import AdapterFile, read_adapter_file, write_adapter_file
from ssvd_peft.adapter_state import (
    AdapterCheckpointError,
    adapter_entries,
    check_base_model,
    load_adapter_entries,
    renamed_adapter,
)
from ssvd_peft.budget import InjectionReport
from ssvd_peft.config import config_from_dict
from ssvd_peft.inject import delete_adapter, inject_adapters
from ssvd_peft.layers.base import DEFAULT_ADAPTER
from ssvd_peft.model_parts import model_part
from ssvd_peft.registry import get_method

__all__ = ["AdapterCheckpointError", "load_adapter", "save_adapter"]


def save_adapter(
    model: nn.Module,
    path: str | Path,
    adapter_name: str = DEFAULT_ADAPTER,
    modules_to_save: list[str] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` (and the full ``modules_to_save``) to ``path``
    (safetensors; ``.safetensors`` is the natural suffix)."""
    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise AdapterCheckpointError(
            f"the model has no adapter named {adapter_name!r} (it has {sorted(configs)}); "
            "inject one with inject_adapters first"
        )
    config = configs[adapter_name]
    modules_to_save = list(modules_to_save or [])
    part = model_part(model, adapter_name)
    adapter = AdapterFile(
        method=config.method,
        config=config.to_dict(),
        tensors=adapter_entries(model, adapter_name, modules_to_save),
        adapter_name=adapter_name,
        modules_to_save=modules_to_save,
        model_part=None if part is None else part.extra_state(),
    )
    return write_adapter_file(adapter, path)


def load_adapter(
    model: nn.Module,
    path: str | Path | AdapterFile,
    adapter_name: str = DEFAULT_ADAPTER,
    config_file: str | Path | None = None,
) -> InjectionReport:
    """Inject the adapter stored at ``path`` (or an adapter file already read, e.g. a merged one)
    into ``model`` (its base model) and load its entries.

    ``config_file``: the experiment's config.yaml of an ESPnet model file, when it is not next to it.
    """
    adapter = path if isinstance(path, AdapterFile) else read_adapter_file(path, config_file)
    source = f"the {adapter.method} adapter given" if isinstance(path, AdapterFile) else str(path)
    check_base_model(model, adapter.fingerprints, source)
    config = config_from_dict(adapter.method, adapter.config)
    report = inject_adapters(model, config, adapter_name)
    try:
        if adapter.model_part is not None and model_part(model, adapter_name) is None:
            get_method(adapter.method).model_part.restore(model, adapter_name, adapter.model_part)
        entries = renamed_adapter(adapter.tensors, adapter.adapter_name, adapter_name)
        load_adapter_entries(model, entries, adapter.modules_to_save, source, adapter_name)
    except AdapterCheckpointError:
        delete_adapter(model, adapter_name)
        raise
    return report
