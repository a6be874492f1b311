"""What every adapter-aware ESPnet task adds to its base task (mixed in before it).

    class PeftASRTask(PeftTaskMixin, ASRTask): ...

Order of events when the config has a peft block:
  1. architecture options the config leaves at their defaults come from the pretrained model's
     config (``pretrained.py``);
  2. the base task builds the model;
  3. --peft_pretrained is loaded strictly, then every --init_param entry (ESPnet's own option,
     moved to --peft_init_param so that it is applied once, before injection, and recorded);
  4. the adapters are injected into the loaded weights (SVD-based methods factorise them;
     HDMoLE also gets its domain router and auxiliary losses), everything but
     the adapters and --peft_modules_to_save is frozen, and the budget is logged (a method's
     ESPnet extension, ``extensions.py``, completes its config before and hooks in after);
  5. with a fusion block, the encoder becomes a ``FusedEncoder`` over the loaded (and adapted)
     encoder, and its head and the fusion block's train_modules are trained too (``fusion.py``);
  6. with --peft_save adapter, model files hold only the adapter entries and the trained modules
     (``state.py``);
  7. in training, before anything is written, a --resume checkpoint must fit the model, and the
     first optimizer step refuses adapters that received no gradient.
Without a peft or fusion block the task is the base task.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from espnet2.train.abs_espnet_model import AbsESPnetModel

from espnet_plugins.extensions import DOMAIN_KEY, extension_for
from espnet_plugins.fusion import add_fusion_arguments, attach_fusion, log_fusion_budget
from espnet_plugins.options import PeftOptions, add_peft_arguments, peft_options
from espnet_plugins.pretrained import (
    PretrainedModelError,
    adopt_pretrained_architecture,
    architecture_keys,
    load_base_weights,
    pretrained_config_path,
)
from espnet_plugins.state import keep_adapter_entries, read_model_file
from espnet_plugins.trainer import PeftTrainer
from ssvd_peft.adapter_state import check_adapter_entries, load_adapter_entries
from ssvd_peft.budget import InjectionReport, training_budget
from ssvd_peft.config import AdapterConfig
from ssvd_peft.gradient_check import require_adapter_gradients
from ssvd_peft.inject import inject_adapters, mark_only_adapters_trainable, merge_adapters

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"


class PeftTaskMixin:
    """Adds the peft block to an ESPnet task (``AbsTask`` subclass that comes after it in the bases)."""

    trainer = PeftTrainer
    merge_on_load: bool = False

    @classmethod
    def add_task_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_task_arguments(parser)
        add_peft_arguments(parser)
        add_fusion_arguments(parser)

    @classmethod
    def main_worker(cls, args: argparse.Namespace) -> None:
        """The base task's worker; then the process group it started (DDP) is closed on every rank."""
        super().main_worker(args)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    @classmethod
    def check_required_command_args(cls, args: argparse.Namespace) -> None:
        """Check the peft block and fill the architecture from the pretrained config (it may supply
        --token_list) before ESPnet checks the required options."""
        options = peft_options(args)
        if options is not None:
            options.adapter_config()
            cls.adopt_pretrained_architecture(args, options)
        super().check_required_command_args(args)

    @classmethod
    def optional_data_names(cls, train: bool = True, inference: bool = False) -> tuple[str, ...]:
        """The base task's, plus ``domain`` (per-utterance domain ids or names, utt2domain, that a
        method such as HDMoLE reads)."""
        return (*super().optional_data_names(train, inference), DOMAIN_KEY)

    @classmethod
    def build_preprocess_fn(cls, args: argparse.Namespace, train: bool) -> Callable[..., Any] | None:
        """The base task's preprocessing, extended by the method's ESPnet extension (HDMoLE: domain
        names become ids first)."""
        preprocess = super().build_preprocess_fn(args, train)
        options = peft_options(args)
        if options is None or options.method is None:
            return preprocess
        return extension_for(options.method).wrap_preprocess(preprocess, options.adapter_config())

    @classmethod
    def build_model(cls, args: argparse.Namespace, training: bool = True) -> AbsESPnetModel:
        """The base task's model with its pretrained weights loaded, the adapters injected and the
        encoder fused (``training``: with the tap cache, if configured)."""
        options = peft_options(args)
        if options is None:
            return super().build_model(args)
        config = options.adapter_config()
        cls.adopt_pretrained_architecture(args, options)
        _record_init_param(args, options)
        model = cls.build_base_model(args, options)
        load_base_weights(model, options, getattr(args, "ignore_init_mismatch", False))
        if config is not None:
            attach_adapters(model, options, config)
        if options.fusion is not None:
            fused = attach_fusion(model, options.fusion, training)
        trained = options.trained_modules()
        mark_only_adapters_trainable(model, modules_to_save=trained)
        if options.save == "adapter":
            keep_adapter_entries(model, trained, always=options.fusion is not None)
        if config is not None:
            budget = training_budget(model, options.adapter_name, trained)
            logger.info("Parameter-efficient fine-tuning with %s:\n%s", config.method, budget)
        if options.fusion is not None:
            log_fusion_budget(model, fused)
        return model

    @classmethod
    def build_base_model(cls, args: argparse.Namespace, options: PeftOptions) -> AbsESPnetModel:
        """The base task's model; an architecture taken from a pretrained config of another task
        (an S2T model given to the ASR task, say) fails with a message that names the file."""
        try:
            return super().build_model(args)
        except TypeError as error:
            source = pretrained_config_path(options)
            if source is None:
                raise
            raise PretrainedModelError(
                f"{cls.__name__} cannot build a model from the architecture in {str(source)!r} "
                f"(the config of --peft_pretrained {options.pretrained!r}): {error}. The pretrained model "
                "is probably of another task: an OWSM / speech-to-text model needs "
                "espnet_plugins.bin.s2t_train, an ASR model espnet_plugins.bin.asr_train"
            ) from None

    @classmethod
    def build_optimizers(
        cls, args: argparse.Namespace, model: torch.nn.Module
    ) -> list[torch.optim.Optimizer]:
        """Training only, before anything is written to --output_dir: a --resume checkpoint must fit
        the model with its adapters. The base task's optimizers then check, at their first step,
        that every trainable adapter parameter received a gradient (``require_adapter_gradients``)."""
        options = peft_options(args)
        if options is None:
            return super().build_optimizers(args, model)
        if getattr(args, "resume", False):
            check_resumable(model, Path(args.output_dir), options.trained_modules())
        optimizers = super().build_optimizers(args, model)
        for optimizer in optimizers:
            require_adapter_gradients(model, optimizer)
        return optimizers

    @classmethod
    def adopt_pretrained_architecture(cls, args: argparse.Namespace, options: PeftOptions) -> None:
        keys = architecture_keys(cls.class_choices_list)
        parser = cls.get_parser()
        adopt_pretrained_architecture(args, options, keys, {key: parser.get_default(key) for key in keys})

    @classmethod
    def build_model_from_file(
        cls,
        config_file: Path | str | None = None,
        model_file: Path | str | None = None,
        device: str = "cpu",
    ) -> tuple[AbsESPnetModel, argparse.Namespace]:
        """Base model + adapter from a training config and a (possibly adapter-only) model file."""
        config_path = (
            Path(config_file) if config_file is not None else Path(model_file).parent / "config.yaml"
        )
        with config_path.open(encoding="utf-8") as f:
            args = argparse.Namespace(**yaml.safe_load(f))
        options = peft_options(args)
        if options is None:
            return super().build_model_from_file(config_file, model_file, device)
        model = cls.build_model(args, training=False)
        if model_file is not None:
            state = read_model_file(model_file, "model file")
            load_adapter_entries(model, state, options.trained_modules(), str(model_file))
        if cls.merge_on_load:
            merge_adapters(model)
        return model.to(device), args


def attach_adapters(model: torch.nn.Module, options: PeftOptions, config: AdapterConfig) -> InjectionReport:
    """Inject the adapters with the method's ESPnet extension (the caller freezes the rest)."""
    extension = extension_for(config.method)
    config = extension.prepare_config(model, config)
    report = inject_adapters(model, config, options.adapter_name)
    extension.after_injection(model, config, options.adapter_name)
    return report


def check_resumable(model: torch.nn.Module, output_dir: Path, modules_to_save: list[str]) -> None:
    """Refuse --resume when ``output_dir/checkpoint.pth`` does not fit ``model`` (another peft block),
    before ESPnet writes config.yaml or the budget over the experiment's own."""
    checkpoint = output_dir / CHECKPOINT
    if not checkpoint.is_file():
        return
    states = read_model_file(checkpoint, "--resume checkpoint", weights_only=False)
    fix = (
        f"It was written with another peft block; nothing in {str(output_dir)!r} was changed. Resume with "
        f"the config it was trained with ({output_dir / 'config.yaml'}), or train into a new --output_dir"
    )
    check_adapter_entries(model, states["model"], modules_to_save, f"--resume: {checkpoint}", fix)


def with_merged_adapters(task: type[Any]) -> type[Any]:
    """The same task, but models loaded from files have their adapters merged into the weights."""
    return type(f"{task.__name__}Merged", (task,), {"merge_on_load": True})


def _record_init_param(args: argparse.Namespace, options: PeftOptions) -> None:
    """Move --init_param to --peft_init_param: loaded once, before injection, and kept in config.yaml."""
    init_param = list(getattr(args, "init_param", None) or [])
    if init_param:
        options.init_param = options.init_param + init_param
        args.peft_init_param = options.init_param
        args.init_param = []
