"""ESPnet's trainer, made aware of adapters. Its options (ESPnet's ``TrainerOptions`` plus the peft
block's method, adapter name and modules_to_save, built from the parsed arguments as ESPnet builds
its own) tell it what to do: write the parameter budget into the experiment directory (the table,
``peft_budget.txt``, and the data, ``peft_budget.json``; with a fusion block, ``fusion_budget.json``),
resume from adapter-only checkpoints, and let the method's ESPnet extension (HDMoLE: per-layer routing
statistics) see every validation epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from espnet2.train.trainer import Trainer, TrainerOptions
from espnet2.utils.build_dataclass import build_dataclass

from espnet_plugins.extensions import extension_for
from espnet_plugins.fusion import fusion_budget
from espnet_plugins.state import read_model_file
from ssvd_peft.adapter_state import load_adapter_entries
from ssvd_peft.budget import training_budget
from ssvd_peft.inject import iter_adapter_layers
from ssvd_peft.layers.base import DEFAULT_ADAPTER

logger = logging.getLogger(__name__)

BUDGET_FILE = "peft_budget.txt"
BUDGET_DATA = "peft_budget.json"
FUSION_BUDGET_DATA = "fusion_budget.json"


@dataclass
class PeftTrainerOptions(TrainerOptions):
    """ESPnet's trainer options and the peft block's (``peft`` is None without one)."""

    peft: str | None = None
    peft_adapter_name: str = DEFAULT_ADAPTER
    peft_modules_to_save: list[str] = field(default_factory=list)
    fusion: dict[str, Any] | None = None


def write_budget(model: torch.nn.Module, options: PeftTrainerOptions) -> None:
    """``peft_budget.txt`` (the table) and ``peft_budget.json`` (the same as data) in the output dir."""
    budget = training_budget(model, options.peft_adapter_name, options.peft_modules_to_save)
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / BUDGET_FILE).write_text(f"{budget}\n", encoding="utf-8")
    (output_dir / BUDGET_DATA).write_text(json.dumps(budget.to_dict(), indent=1) + "\n", encoding="utf-8")
    logger.info("Wrote the adapter parameter budget to %s and %s", BUDGET_FILE, BUDGET_DATA)


def write_fusion_budget(model: torch.nn.Module, options: PeftTrainerOptions) -> None:
    """``fusion_budget.json``: the parameter counts of a fused model (head, encoder adapters, trainable)."""
    path = Path(options.output_dir) / FUSION_BUDGET_DATA
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fusion_budget(model), indent=1) + "\n", encoding="utf-8")
    logger.info("Wrote the fusion parameter counts to %s", FUSION_BUDGET_DATA)


class PeftTrainer(Trainer):
    """``Trainer`` whose ``checkpoint.pth`` may hold only the adapter entries."""

    @classmethod
    def build_options(cls, args: argparse.Namespace) -> PeftTrainerOptions:
        return build_dataclass(PeftTrainerOptions, args)

    @classmethod
    def run(
        cls,
        model: torch.nn.Module,
        *,
        trainer_options: PeftTrainerOptions,
        distributed_option: Any,
        **kwargs: Any,
    ) -> None:
        is_main = not distributed_option.distributed or distributed_option.dist_rank == 0
        if trainer_options.peft is not None and is_main:
            write_budget(model, trainer_options)
        if trainer_options.fusion is not None and is_main:
            write_fusion_budget(model, trainer_options)
        super().run(
            model=model, trainer_options=trainer_options, distributed_option=distributed_option, **kwargs
        )

    @classmethod
    def validate_one_epoch(
        cls,
        model: torch.nn.Module,
        iterator: Any,
        reporter: Any,
        options: PeftTrainerOptions,
        distributed_option: Any,
    ) -> None:
        """ESPnet's validation, between the method extension's ``validation_started`` and
        ``validation_finished`` (rank 0 writes what it gathered: its share of the data)."""
        if options.peft is None:
            super().validate_one_epoch(model, iterator, reporter, options, distributed_option)
            return
        extension = extension_for(options.peft)
        unwrapped = getattr(model, "module", model)
        extension.validation_started(unwrapped)
        super().validate_one_epoch(model, iterator, reporter, options, distributed_option)
        if not distributed_option.distributed or distributed_option.dist_rank == 0:
            extension.validation_finished(unwrapped, Path(options.output_dir), reporter.epoch)

    @staticmethod
    def resume(
        checkpoint: str | Path,
        model: torch.nn.Module,
        reporter: Any,
        optimizers: Sequence[torch.optim.Optimizer],
        schedulers: Sequence[Any],
        scaler: Any,
        ngpu: int = 0,
        strict: bool = True,
    ) -> None:
        """Load model entries with the adapter checks, then ESPnet's reporter/optimizer/scheduler states."""
        if not any(True for _ in iter_adapter_layers(model)):
            Trainer.resume(checkpoint, model, reporter, optimizers, schedulers, scaler, ngpu, strict)
            return
        states = read_model_file(checkpoint, "--resume checkpoint", weights_only=False)
        load_adapter_entries(model, states["model"], [], str(checkpoint))
        Trainer.resume(checkpoint, model, reporter, optimizers, schedulers, scaler, ngpu, strict=False)
