"""What a method adds to ESPnet beyond injection, looked up by method name (never tested by name).

A method that needs more of ESPnet than the generic task gives (HDMoLE: its router's feature
width from the frontend, domain labels in the batch, auxiliary losses in the training loss, a
fixed-domain export) registers an ``EspnetExtension`` from its ESPnet module; every other method
gets the default, which changes nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ssvd_peft.config import AdapterConfig

Preprocess = Callable[[str, dict[str, Any]], dict[str, Any]] | None


class EspnetExtension:
    """The default: nothing beyond injection."""

    def prepare_config(self, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        """The config to inject with, completed from the ESPnet model (before injection)."""
        return config

    def wrap_preprocess(self, preprocess: Preprocess, config: AdapterConfig) -> Preprocess:
        """The task's data preprocessing, extended for the method."""
        return preprocess

    def after_injection(self, model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        """Hook the method into ESPnet's training (losses, statistics) after injection."""

    def validation_started(self, model: nn.Module) -> None:
        """A validation epoch begins (the trainer calls it on every rank)."""

    def validation_finished(self, model: nn.Module, output_dir: Path, epoch: int) -> None:
        """A validation epoch ended (the trainer calls it on rank 0): write what it gathered."""

    def fixed_merge(self, model: nn.Module, config: AdapterConfig, adapter_name: str, choice: str) -> None:
        """Merge an adapter without an exact merge for one fixed condition (``--peft_domain``)."""
        raise ValueError(f"{config.method} has no fixed-condition merge; export it without --peft_domain")


BUILTIN_EXTENSIONS = ("espnet_plugins.hdmole",)
DOMAIN_KEY = "domain"
_EXTENSIONS: dict[str, EspnetExtension] = {}


def register_extension(method: str, extension: EspnetExtension) -> None:
    _EXTENSIONS[method] = extension


def extension_for(method: str) -> EspnetExtension:
    """The ESPnet extension of ``method`` (the default for methods that need none)."""
    for module in BUILTIN_EXTENSIONS:
        importlib.import_module(module)
    return _EXTENSIONS.get(method, EspnetExtension())
