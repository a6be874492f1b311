#!/usr/bin/env python3
"""Stage 3: the training config of one fine-tuning run = training options + one method's peft block,
or, for full fine-tuning, the OWSM model's options + training options + full fine-tuning's own.

    conf/tuning/<model>.yaml  (optimiser, scheduler, batches, epochs, preprocessor, specaug)
  + --peft conf/peft/<method>.yaml   (peft, peft_conf, ... : only keys that start with "peft")
  -> <out>                    one ESPnet training YAML for espnet_plugins.bin.s2t_train

With --peft the model itself (encoder, decoder, token list, BPE model, feature statistics) comes
from the pretrained OWSM config next to --peft_pretrained, so neither file names it. The peft block
is checked here (ssvd_peft.config), so a wrong option fails before a GPU job starts.

    --full_from <owsm>/config.yaml   (the options that define the model: component choices and
                                      their confs, tokens, BPE model)
  + conf/tuning/<model>.yaml
  + --full_conf conf/full.yaml       (full fine-tuning's own values, e.g. its learning rate; a
                                      mapping such as optim_conf updates the tuning file's)
  -> <out>                    a complete config for stock espnet2.bin.s2t_train --init_param
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from espnet_plugins.modules import stock_task
from espnet_plugins.pretrained import architecture_keys
from ssvd_peft.config import PeftConfigError, config_from_dict


class ConfigError(Exception):
    """A tuning or peft file that cannot be combined; the message says what to change."""


def load_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of options")
    return content


def combined(
    tuning: dict[str, Any], peft: dict[str, Any], tuning_path: Path, peft_path: Path
) -> dict[str, Any]:
    """The tuning options followed by the peft block, after checking that each file keeps to its part."""
    stray = [key for key in peft if not key.startswith("peft")]
    if stray or "peft" not in peft:
        raise ConfigError(
            f"{peft_path} must hold the peft block only (peft: <method>, peft_conf: ...); found {stray}"
        )
    overlap = [key for key in tuning if key.startswith("peft")]
    if overlap:
        raise ConfigError(f"{tuning_path} sets {overlap}; the peft block belongs in conf/peft/<method>.yaml")
    try:
        config_from_dict(peft["peft"], dict(peft.get("peft_conf") or {}))
    except PeftConfigError as error:
        raise ConfigError(f"{peft_path}: {error}") from None
    return {**tuning, **peft}


def full_fine_tuning(
    tuning: dict[str, Any], owsm: dict[str, Any], full: dict[str, Any], tuning_path: Path
) -> dict[str, Any]:
    """The OWSM config's model options, the tuning options, then ``full``'s (mappings updated)."""
    overlap = [key for key in tuning if key.startswith("peft")]
    if overlap:
        raise ConfigError(f"{tuning_path} sets {overlap}; the peft block belongs in conf/peft/<method>.yaml")
    model = {key: owsm[key] for key in architecture_keys(stock_task("s2t").class_choices_list) if key in owsm}
    config = {**model, **tuning}
    for key, value in full.items():
        both_mappings = isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = {**config[key], **value} if both_mappings else value
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tuning", type=Path, required=True, help="conf/tuning/<model>.yaml")
    method = parser.add_mutually_exclusive_group(required=True)
    method.add_argument("--peft", type=Path, help="peft block, conf/peft/<method>.yaml")
    method.add_argument("--full_from", type=Path, help="full fine-tuning of this OWSM config.yaml")
    parser.add_argument("--full_conf", type=Path, help="full fine-tuning's own options (with --full_from)")
    parser.add_argument("--out", type=Path, required=True, help="output: the combined training YAML")
    args = parser.parse_args(argv)
    try:
        tuning = load_mapping(args.tuning)
        if args.peft is not None:
            config = combined(tuning, load_mapping(args.peft), args.tuning, args.peft)
        else:
            full = load_mapping(args.full_conf) if args.full_conf is not None else {}
            config = full_fine_tuning(tuning, load_mapping(args.full_from), full, args.tuning)
    except ConfigError as error:
        print(f"finetune_config.py: error: {error}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
