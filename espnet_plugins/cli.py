"""``ssvd-peft`` subcommands for ESPnet models (registered through the ``ssvd_peft.commands``
entry point, so the core command never imports espnet).

    ssvd-peft modules --config exp/asr_base/config.yaml [--model_file exp/asr_base/valid.acc.ave.pth]
    ssvd-peft budget  --config exp/asr_base/config.yaml --peft conf/peft/ssvd_o.yaml [--compare]

``modules`` lists every nn.Linear an adapter can target, with its shape; ``budget`` prints the
trainable-parameter table of a peft block on that model, and with ``--compare`` the rank / k
every method needs to train the same number of parameters. Nothing is trained.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from espnet_plugins.modules import STOCK_TASKS, build_meta_model, targetable_modules
from ssvd_peft.budget import KNOBS, equal_budget_configs, estimate_budget, format_budget_table
from ssvd_peft.config import PeftConfigError, config_from_dict


def register(commands: Any) -> None:
    """Add the ``modules`` and ``budget`` subcommands to the ``ssvd-peft`` parser."""
    modules = commands.add_parser("modules", help="list the targetable nn.Linear modules of an ESPnet model")
    _add_model_arguments(modules)
    modules.add_argument("--model_file", type=Path, help="check the listed weights against this file")
    modules.set_defaults(func=_run_modules)

    budget = commands.add_parser(
        "budget", help="trainable-parameter table of a peft block on an ESPnet model"
    )
    _add_model_arguments(budget)
    budget.add_argument(
        "--peft", type=Path, help="YAML with `peft:` and `peft_conf:` (default: the block in --config)"
    )
    budget.add_argument(
        "--compare", action="store_true", help="also print every method's rank / k at this block's budget"
    )
    budget.set_defaults(func=_run_budget)


def read_peft_block(path: Path) -> tuple[str, dict[str, Any]]:
    """(method, options) of the `peft:` / `peft_conf:` block in a YAML file."""
    if not path.is_file():
        raise PeftConfigError(f"{str(path)!r} does not exist; give a YAML file with a `peft:` block")
    block = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not block.get("peft"):
        raise PeftConfigError(f"{str(path)!r} has no `peft:` key; add e.g. `peft: ssvd_o` and `peft_conf:`")
    return block["peft"], dict(block.get("peft_conf") or {})


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the model's ESPnet config.yaml")
    parser.add_argument("--task", choices=sorted(STOCK_TASKS), default="asr")


def _run_modules(args: argparse.Namespace) -> None:
    rows = targetable_modules(args.config, args.model_file, args.task)
    width = max(len(row.name) for row in rows)
    for row in rows:
        print(f"{row.name:<{width}}  {row.in_features:>6} -> {row.out_features:<6}")
    print(f"{len(rows)} nn.Linear modules")


def _run_budget(args: argparse.Namespace) -> None:
    method, options = read_peft_block(args.peft or args.config)
    model = build_meta_model(args.config, args.task)
    report = estimate_budget(model, config_from_dict(method, options))
    print(format_budget_table(report))
    if args.compare:
        targets = {key: options[key] for key in ("target_modules", "exclude_modules") if key in options}
        methods = {name: targets for name in KNOBS if name != "hdmole"}
        print(f"\nevery method at this block's budget ({report.trainable:,} trainable parameters):")
        for name, config in equal_budget_configs(model, report.trainable, methods).items():
            total = estimate_budget(model, config).trainable
            print(f"  {name:<7} {KNOBS[name]} = {getattr(config, KNOBS[name]):<5} trainable {total:,}")
