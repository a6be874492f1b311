"""Running ESPnet's own inference programs with an adapter-aware task.

ESPnet's ``espnet2.bin.<task>_inference`` modules build their model with the task class they
import (``ASRTask.build_model_from_file``). ``run_with_task`` runs such a module's
``inference`` with that name bound to a subclass that also loads the adapter, and restores
the module afterwards; every decoding option and output file stays ESPnet's.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from espnet2.utils.types import str2bool

from espnet_plugins.task import with_merged_adapters


def add_merge_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--peft_merge",
        type=str2bool,
        default=False,
        help="Merge the adapters into the base weights before decoding (same output, base-model speed)",
    )


def run_with_task(
    stock: ModuleType, task_name: str, task: type[Any], kwargs: dict[str, Any], merge: bool
) -> None:
    """``stock.inference(**kwargs)`` with ``stock.<task_name>`` replaced by ``task``."""
    with _replaced(stock, task_name, with_merged_adapters(task) if merge else task):
        stock.inference(**kwargs)


@contextmanager
def _replaced(module: ModuleType, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
