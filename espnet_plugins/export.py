"""An ordinary ESPnet model from base + adapter: W' = W + delta W folded into every adapted layer.

``export_merged`` writes ``config.yaml`` (the training config without the peft block) and
``model.pth`` (the full merged state dict) into a directory. Stock ESPnet loads them with no
plugin (``espnet2.bin.asr_inference --asr_train_config <dir>/config.yaml --asr_model_file
<dir>/model.pth``) and decodes exactly as the adapted model does. Before writing, the merged
state dict is checked against a model built by the stock task from the written config.
An HDMoLE adapter is exported for one fixed domain (``domain``, ``--peft_domain``: an id, or a
name from the training config's ``peft_hdmole.domains``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

from espnet_plugins.hdmole import is_domain_id
from espnet_plugins.options import peft_options, without_peft_options
from espnet_plugins.task import PeftTaskMixin
from ssvd_peft.inject import iter_adapter_layers, merge_and_unload
from ssvd_peft.layers.hdmole import HdmoleAdapter, merge_domain_experts

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

    An HDMoLE adapter routes per token, so it is merged for one fixed ``domain``:
    W + delta W_d (``merge_domain_experts``), the routed layer with g = e_d and uniform local
    routing. The export then decodes that domain only, and not exactly as the routed model.
    ``domain`` is an id or a name from the training config's ``peft_hdmole.domains``.
    """
    model, args = task.build_model_from_file(train_config, model_file, "cpu")
    if any(
        isinstance(layer.peft_adapters[layer.active_adapter], HdmoleAdapter)
        for _, layer in iter_adapter_layers(model)
        if layer.active_adapter is not None
    ):
        if domain is None:
            raise ExportError(
                "an HDMoLE adapter routes every token by its input and cannot be merged as it is; "
                "give the domain to merge for (--peft_domain <id or name>): its experts are folded into "
                "the weights"
            )
        merge_domain_experts(model, export_domain(domain, args), args.peft_adapter_name)
    elif domain is not None:
        raise ExportError("--peft_domain is for HDMoLE adapters; this adapter merges exactly without it")
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


def export_domain(domain: int | str, args: argparse.Namespace) -> int:
    """The id of ``domain``: an id (int or integer string) or a name in ``args``' peft_hdmole.domains."""
    if isinstance(domain, int) or is_domain_id(domain):
        return int(domain)
    names = peft_options(args).hdmole_options().domains or ()
    if domain not in names:
        known = f"the names {list(names)}" if names else "no names (peft_hdmole.domains is not set)"
        raise ExportError(
            f"--peft_domain {domain!r} is not a domain of this adapter: its training config has "
            f"{known}; give a domain id or one of the names"
        )
    index = names.index(domain)
    logger.info("Domain %r is domain id %d", domain, index)
    return index


def check_stock_keys(task: type[Any], config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
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
