"""Which modules of an ESPnet model adapters can target (for ``ssvd-peft modules``).

    rows = targetable_modules("exp/asr_base/config.yaml", "exp/asr_base/valid.acc.ave.pth")
    for row in rows: print(row.name, row.in_features, row.out_features)

The model is built on the meta device (no memory, any size), by the stock task, from the config
without its peft block. With a model file, every listed weight is checked against it.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from espnet_plugins.offline import import_without_downloads
from espnet_plugins.options import without_peft_options

STOCK_TASKS = {"asr": ("espnet2.tasks.asr", "ASRTask"), "s2t": ("espnet2.tasks.s2t", "S2TTask")}


@dataclass(frozen=True)
class TargetableModule:
    """One ``nn.Linear`` an adapter can wrap: its name and its in -> out shape."""

    name: str
    in_features: int
    out_features: int


def targetable_modules(
    config_file: str | Path, model_file: str | Path | None = None, task: str = "asr"
) -> list[TargetableModule]:
    """The ``nn.Linear`` modules of the model that ``config_file`` describes, in model order."""
    model = build_meta_model(config_file, task)
    rows = [
        TargetableModule(name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _inside_multihead_attention(model, name)
    ]
    if model_file is not None:
        check_against_model_file(rows, Path(model_file))
    return rows


def build_meta_model(config_file: str | Path, task: str = "asr") -> nn.Module:
    """The base model of an ESPnet config (peft block ignored), on the meta device."""
    with open(config_file, encoding="utf-8") as f:
        args = argparse.Namespace(**without_peft_options(yaml.safe_load(f)))
    with torch.device("meta"):
        return stock_task(task).build_model(args)


def stock_task(task: str) -> type:
    """ESPnet's own task class for ``task`` (imported on first use, without network access)."""
    if task not in STOCK_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(STOCK_TASKS)}")
    import_without_downloads("g2p_en")
    module_name, class_name = STOCK_TASKS[task]
    return getattr(importlib.import_module(module_name), class_name)


def check_against_model_file(rows: list[TargetableModule], model_file: Path) -> None:
    """Every listed weight must be in ``model_file`` with the listed shape."""
    state = torch.load(model_file, map_location="cpu", weights_only=True, mmap=True)
    for row in rows:
        weight = state.get(f"{row.name}.weight")
        if weight is None or tuple(weight.shape) != (row.out_features, row.in_features):
            found = "missing" if weight is None else f"of shape {tuple(weight.shape)}"
            raise ValueError(
                f"{model_file}: {row.name}.weight is {found}, but the config builds a "
                f"{row.in_features} -> {row.out_features} layer; give the config the model was trained with"
            )


def _inside_multihead_attention(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention)
