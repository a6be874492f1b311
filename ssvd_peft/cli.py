"""The ``ssvd-peft`` command.

    ssvd-peft showcase             every method on a small model: budget, learning vs forgetting
    ssvd-peft info FILE            what an adapter file holds: method, options, layers, budget, base
    ssvd-peft convert OLD NEW      rewrite an adapter file (an older format, an ESPnet model file)
                                   as a current one (safetensors)
    ssvd-peft merge ...            merge fine-tuned models or adapters of one base model
                                   (``ssvd_peft.merging.command``)

Packages add subcommands through the ``ssvd_peft.commands`` entry-point group: each entry is a
function ``register(subparsers)`` that adds a parser whose ``func`` default runs it (the ESPnet
plugin adds its model-inspection commands this way, so this module never imports espnet).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

import torch

from ssvd_peft.adapter_file import read_adapter_file, write_adapter_file
from ssvd_peft.adapter_info import describe_adapter
from ssvd_peft.config import PeftConfigError
from ssvd_peft.merging.command import add_merge_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssvd-peft", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    showcase = commands.add_parser("showcase", help="run every method on a small model and print the tables")
    showcase.add_argument("--steps", type=int, default=300, help="adaptation steps per method")
    showcase.add_argument("--pretrain-steps", type=int, default=600, help="source-domain pretraining steps")
    showcase.add_argument("--seed", type=int, default=0)
    showcase.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    showcase.set_defaults(func=_run_showcase)

    info = commands.add_parser(
        "info", help="what an adapter file holds: method, options, layers, budget, base"
    )
    info.add_argument("file", type=Path, help="an adapter file (save_adapter) or an ESPnet model file")
    info.add_argument("--config", type=Path, help="the experiment's config.yaml of an ESPnet model file")
    info.set_defaults(func=_run_info)

    convert = commands.add_parser("convert", help="rewrite an adapter file in the current format")
    convert.add_argument("old", type=Path, help="an adapter file of any format, or an ESPnet model file")
    convert.add_argument("new", type=Path, help="the file to write (safetensors)")
    convert.add_argument("--config", type=Path, help="the experiment's config.yaml of an ESPnet model file")
    convert.set_defaults(func=_run_convert)

    add_merge_parser(commands)

    for entry in entry_points(group="ssvd_peft.commands"):
        entry.load()(commands)
    return parser


def _run_showcase(args: argparse.Namespace) -> None:
    from ssvd_peft.showcase import run_showcase

    torch.set_num_threads(args.threads)
    print(run_showcase(steps=args.steps, pretrain_steps=args.pretrain_steps, seed=args.seed))


def _run_info(args: argparse.Namespace) -> None:
    print(describe_adapter(read_adapter_file(args.file, args.config), str(args.file)))


def _run_convert(args: argparse.Namespace) -> None:
    adapter = read_adapter_file(args.old, args.config)
    path = write_adapter_file(adapter, args.new)
    print(f"wrote {path} ({adapter.method}, {len(adapter.fingerprints)} layers)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PeftConfigError as error:
        print(f"ssvd-peft: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
