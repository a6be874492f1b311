"""The pretrained base model under the adapters: its architecture and its weights.

The model-defining options (the task's component choices and their ``*_conf``, the token list
and tokenizer, the input size) that a fine-tuning config does not set come from the pretrained
model's own training config, so a fine-tuning config only needs the peft block, the data and
the optimisation options. The
weights are loaded strictly: a base model that is partly random would be adapted silently.
"""

from __future__ import annotations

import argparse
import copy
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from espnet2.torch_utils.load_pretrained_model import load_pretrained_model
from espnet2.train.class_choices import ClassChoices
from torch import nn

from espnet_plugins.options import PeftOptions
from espnet_plugins.state import read_model_file

logger = logging.getLogger(__name__)

MODEL_KEYS = (
    "token_list",
    "token_type",
    "bpemodel",
    "non_linguistic_symbols",
    "cleaner",
    "g2p",
    "input_size",
    "ctc_conf",
    "joint_net_conf",
)
TRAINING_ONLY_CHOICES = ("specaug",)


class PretrainedModelError(ValueError):
    """A pretrained model that cannot serve as the base; the message says what to fix."""


def architecture_keys(class_choices: list[ClassChoices]) -> list[str]:
    """Options that decide which parameters a model has: component choices, their confs, tokens."""
    keys: list[str] = []
    for choices in class_choices:
        if choices.name not in TRAINING_ONLY_CHOICES:
            keys += [choices.name, f"{choices.name}_conf"]
    return keys + list(MODEL_KEYS)


def pretrained_config_path(options: PeftOptions) -> Path | None:
    """--peft_pretrained_config, else config.yaml next to --peft_pretrained if it exists."""
    if options.pretrained_config is not None:
        path = Path(options.pretrained_config)
        if not path.is_file():
            raise PretrainedModelError(f"--peft_pretrained_config {str(path)!r} does not exist")
        return path
    if options.pretrained is None:
        return None
    candidate = Path(options.pretrained).parent / "config.yaml"
    return candidate if candidate.is_file() else None


def adopt_pretrained_architecture(
    args: argparse.Namespace, options: PeftOptions, keys: list[str], defaults: dict[str, Any]
) -> None:
    """Give every architecture key that this config leaves at its default the pretrained config's value.

    A value set in this config wins (a warning names it when it differs from the pretrained one).
    """
    path = pretrained_config_path(options)
    if path is None:
        return
    pretrained = copy.deepcopy(read_config(path.resolve(), path.stat().st_mtime_ns))
    for key in keys:
        if key not in pretrained:
            continue
        current = getattr(args, key, None)
        if current is None or current == defaults.get(key):
            setattr(args, key, pretrained[key])
        elif current != pretrained[key] and not _same_token_list(current, pretrained[key]):
            logger.warning(
                "%s differs from the pretrained model's config %s; using this config's value", key, path
            )


@lru_cache(maxsize=4)
def read_config(path: Path, _mtime_ns: int) -> dict[str, Any]:
    """A training config.yaml, read once per process (and again if the file changes); callers copy it."""
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_base_weights(model: nn.Module, options: PeftOptions, ignore_init_mismatch: bool) -> None:
    """Load --peft_pretrained (every parameter) and then the recorded --init_param entries."""
    if options.pretrained is not None:
        load_full_state(model, options.pretrained)
    for init_param in options.init_param:
        logger.info("Loading pretrained params from %s (before injecting the adapters)", init_param)
        load_pretrained_model(
            init_param=init_param, model=model, ignore_init_mismatch=ignore_init_mismatch, map_location="cpu"
        )


def load_full_state(model: nn.Module, path: str) -> None:
    """``model.load_state_dict`` of a complete ESPnet model file, with a clear error otherwise."""
    if not Path(path).is_file():
        raise PretrainedModelError(f"--peft_pretrained {path!r} does not exist")
    logger.info("Loading the pretrained base model from %s", path)
    state = read_model_file(path, "--peft_pretrained", weights_only=False)
    missing, unexpected = _key_differences(model, state)
    if missing or unexpected:
        raise PretrainedModelError(
            f"--peft_pretrained {path!r} does not fit the model built from the config: "
            f"missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} "
            f"({len(unexpected)} in all). Give the pretrained model's config.yaml "
            "(--peft_pretrained_config, or put it next to the model file), or load a partial "
            "model with --init_param"
        )
    model.load_state_dict(state)


def _key_differences(model: nn.Module, state: dict[str, Any]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def _same_token_list(current: Any, pretrained: Any) -> bool:
    """A token list given as a file path equals the pretrained config's list of tokens."""
    if not isinstance(current, str) or not isinstance(pretrained, list) or not Path(current).is_file():
        return False
    with open(current, encoding="utf-8") as f:
        return [line.rstrip() for line in f] == pretrained
