"""ESPnet's trainer, made aware of adapters: it resumes from adapter-only checkpoints, writes
the parameter budget into the experiment directory and, with HDMoLE, the per-layer routing
statistics of every validation epoch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from espnet2.train.trainer import Trainer

from espnet_plugins.hdmole import STATS_DIR
from espnet_plugins.state import read_model_file
from ssvd_peft.adapter_state import is_adapter_entry, load_adapter_entries
from ssvd_peft.layers.base import ADAPTERS_ATTR, is_adapter_parameter

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
    routers = [
        (name, parameter.numel())
        for name, parameter in model.named_parameters()
        if name.startswith(f"{ADAPTERS_ATTR}.")
    ]
    if routers:
        lines.append(
            f"domain router {ADAPTERS_ATTR}.{model.peft_options.adapter_name}: "
            f"{sum(count for _, count in routers):,} parameters in {len(routers)} tensors"
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

    @classmethod
    def validate_one_epoch(
        cls, model: torch.nn.Module, iterator: Any, reporter: Any, options: Any, distributed_option: Any
    ) -> None:
        """ESPnet's validation; with HDMoLE, the per-layer routing statistics of the epoch are then
        written to ``<output_dir>/hdmole_stats/valid.<epoch>.txt`` (rank 0: its share of the data)."""
        statistics = getattr(_unwrapped(model), "hdmole_layer_statistics", None)
        if statistics is None:
            super().validate_one_epoch(model, iterator, reporter, options, distributed_option)
            return
        statistics.reset()
        super().validate_one_epoch(model, iterator, reporter, options, distributed_option)
        if not distributed_option.distributed or distributed_option.dist_rank == 0:
            statistics.write(Path(options.output_dir) / STATS_DIR / f"valid.{reporter.epoch}.txt")

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
        states = read_model_file(checkpoint, "--resume checkpoint", weights_only=False)
        load_adapter_entries(model, states["model"], options.modules_to_save, str(checkpoint))
        Trainer.resume(checkpoint, model, reporter, optimizers, schedulers, scaler, ngpu, strict=False)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / DataParallel."""
    return getattr(model, "module", model)
