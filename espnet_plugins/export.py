"""An ordinary ESPnet model from base + adapter: W' = W + delta W folded into every adapted layer.

``export_merged`` writes ``config.yaml`` (the training config without the peft block) and
``model.pth`` (the full merged state dict) into a directory. Stock ESPnet loads them with no
plugin (``espnet2.bin.asr_inference --asr_train_config <dir>/config.yaml --asr_model_file
<dir>/model.pth``) and decodes exactly as the adapted model does. Before writing, the merged
state dict is checked against a model built by the stock task from the written config.
An adapter without an exact merge (HDMoLE) is exported for one fixed condition (``domain``,
``--peft_domain``: for HDMoLE a domain id, or a name from the config's ``domains``), by its
method's ESPnet extension. A feature-fusion model has no such export (``fusion.py``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

from espnet_plugins.extensions import extension_for
from espnet_plugins.fusion import FUSION_KEY
from espnet_plugins.options import peft_options, without_peft_options
from espnet_plugins.task import PeftTaskMixin
from ssvd_peft.inject import merge_and_unload
from ssvd_peft.registry import get_method

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pth"


class ExportError(RuntimeError):
    """A merged model that stock ESPnet would not load as it is."""


def export_merged(
    task: type[Any],
    train_config: str | Path,
    model_file: str | Path,
    output_dir: str | Path,
    domain: int | str | None = None,
) -> tuple[Path, Path]:
    """Merge the adapter of ``model_file`` into its base model; return (config path, model path).

    An adapter without an exact merge is merged for one fixed ``domain`` by its method's ESPnet
    extension: HDMoLE folds W + delta W_d (``merge_domain_experts``), the routed layer with
    g = e_d and uniform local routing; the export then serves that domain only, and not exactly
    as the routed model. ``domain`` is an id or a name from the config's ``domains``.
    """
    with open(train_config, encoding="utf-8") as f:
        fused = bool(yaml.safe_load(f).get(FUSION_KEY))
    if fused:
        raise ExportError(
            f"{train_config} is a feature-fusion model: its decoder reads the fusion head's output, "
            "which no stock ESPnet encoder computes, so it has no plain-model export; decode it with "
            "espnet_plugins.bin.asr_inference (or s2t_inference), with --peft_merge true to merge adapters"
        )
    model, args = task.build_model_from_file(train_config, model_file, "cpu")
    options = peft_options(args)
    config = options.adapter_config()
    if not get_method(config.method).exact_merge:
        if domain is None:
            raise ExportError(
                f"a {config.method} adapter has no exact merge (HDMoLE routes every token by its input); "
                "give the domain to merge for (--peft_domain <id or name>): its experts are folded into "
                "the weights"
            )
        extension_for(config.method).fixed_merge(model, config, options.adapter_name, str(domain))
    elif domain is not None:
        raise ExportError(
            f"--peft_domain is for adapters without an exact merge (HDMoLE); {config.method} merges "
            "exactly without it"
        )
    merge_and_unload(model)
    state = model.state_dict()
    config = without_peft_options(vars(args))
    check_stock_keys(task, config, state)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path, model_path = output_dir / CONFIG_FILE, output_dir / MODEL_FILE
    with config_path.open("w", encoding="utf-8") as f:
        yaml_no_alias_safe_dump(config, f, indent=4, sort_keys=False)
    torch.save(state, model_path)
    logger.info("Wrote the merged model to %s and its config to %s", model_path, config_path)
    return config_path, model_path


def check_stock_keys(task: type[Any], config: dict[str, Any], state: Mapping[str, Any]) -> None:
    """The stock task (the first base that is not adapter-aware) must build a model with these keys."""
    stock_task = next(
        base for base in task.__mro__ if "build_model" in vars(base) and not issubclass(base, PeftTaskMixin)
    )
    with torch.device("meta"):
        expected = set(stock_task.build_model(argparse.Namespace(**config)).state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(
            f"the merged state dict does not match the stock {stock_task.__name__} model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
