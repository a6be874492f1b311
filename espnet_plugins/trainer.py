"""ESPnet's trainer, made aware of adapters: it resumes from adapter-only checkpoints and
writes the parameter budget into the experiment directory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from espnet2.train.trainer import Trainer

from espnet_plugins.state import is_adapter_entry, load_adapter_entries
from ssvd_peft.inject import is_adapter_parameter

logger = logging.getLogger(__name__)

BUDGET_FILE = "peft_budget.txt"


def budget_summary(model: torch.nn.Module) -> str:
    """The adapter budget table of the injection, plus the modules_to_save and the trainable total."""
    lines = [str(model.peft_report)]
    saved = [
        (name, parameter.numel())
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
        and is_adapter_entry(name, model.peft_options.modules_to_save)
        and not is_adapter_parameter(name)
    ]
    if saved:
        lines.append(
            f"modules_to_save {model.peft_options.modules_to_save}: "
            f"{sum(count for _, count in saved):,} parameters in {len(saved)} tensors"
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lines.append(
        f"trainable in all: {trainable:,} of {total:,} parameters ({100.0 * trainable / total:.3f}%)"
    )
    return "\n".join(lines)


class PeftTrainer(Trainer):
    """``Trainer`` whose ``checkpoint.pth`` may hold only the adapter entries."""

    @classmethod
    def run(
        cls, model: torch.nn.Module, *, trainer_options: Any, distributed_option: Any, **kwargs: Any
    ) -> None:
        is_main = not distributed_option.distributed or distributed_option.dist_rank == 0
        if getattr(model, "peft_report", None) is not None and is_main:
            path = Path(trainer_options.output_dir) / BUDGET_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{budget_summary(model)}\n", encoding="utf-8")
            logger.info("Wrote the adapter parameter budget to %s", path)
        super().run(
            model=model, trainer_options=trainer_options, distributed_option=distributed_option, **kwargs
        )

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
        options = getattr(model, "peft_options", None)
        if options is None:
            Trainer.resume(checkpoint, model, reporter, optimizers, schedulers, scaler, ngpu, strict)
            return
        states = torch.load(checkpoint, map_location="cpu", weights_only=False)
        load_adapter_entries(model, states["model"], options.modules_to_save, str(checkpoint))
        Trainer.resume(checkpoint, model, reporter, optimizers, schedulers, scaler, ngpu, strict=False)
