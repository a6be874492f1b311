"""``ssvd-peft`` subcommands for ESPnet models (registered through the ``ssvd_peft.commands``
entry point, so the core command never imports espnet).

    ssvd-peft modules --config exp/asr_base/config.yaml [--model_file exp/asr_base/valid.acc.ave.pth]
    ssvd-peft budget  --config exp/asr_base/config.yaml --peft conf/peft/ssvd_o.yaml [--compare]

``modules`` lists every nn.Linear an adapter can target, with its shape; ``budget`` prints the
trainable-parameter table of a peft block on that model, and with ``--compare`` the block's own
count next to the rank / k every other method needs to train the same number of parameters
(marked where the budget is out of that method's reach). Nothing is trained.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import yaml

from espnet_plugins.modules import STOCK_TASKS, build_meta_model, targetable_modules
from ssvd_peft.budget import (
    BudgetMatch,
    BudgetShortfallWarning,
    equal_budget_configs,
    estimate_budget,
    format_budget_table,
)
from ssvd_peft.config import PeftConfigError, config_from_dict
from ssvd_peft.registry import get_method, method_names


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
        print(f"\nevery method at this block's budget ({report.trainable:,} trainable parameters):")
        print(f"  {method:<7} this block        trainable {report.trainable:,}")
        for match in compare_methods(model, method, options, report.trainable).values():
            reach = "" if match.reached else f"  out of reach: {match.shortfall:+,}"
            print(
                f"  {match.method:<7} {match.knob} = {match.value:<10} trainable {match.trainable:,}{reach}"
            )


def compare_methods(model: Any, method: str, options: dict[str, Any], budget: int) -> dict[str, BudgetMatch]:
    """Every other method (HDMoLE aside) at ``budget`` on the block's targets; the block's own
    method stays as the block configures it (its options and overrides)."""
    targets = {key: options[key] for key in ("target_modules", "exclude_modules") if key in options}
    others = {name: targets for name in method_names() if name != method and get_method(name).exact_merge}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetShortfallWarning)
        return equal_budget_configs(model, budget, others)
