"""The blind protocol of the merging stages (11-12): every merge knob (the scaling lambda, TIES and PCB
density, BoostedTSV-M's beta) is chosen on the combined in-domain dev sets and frozen in a dated file
before any test decode, and a merge is decoded on a test only at the knobs so frozen.

The tuning merges (local/merge_plan.py --tune: each algorithm with a grid, over the seed-0 runs)
search their grid on dev and record it in their ``merge.yaml``; ``choose`` collects every grid and
choice. The merges of the table (local/merge_plan.py --frozen, every seed) are made at the frozen
knobs, without a search; ``check`` is stage 12's guard.

    local/merge_freeze.py choose --merges exp/quick/merged/tune.tsv --exp exp/quick \
        --out exp/quick/frozen/merging
        -> exp/quick/frozen/merging/<UTC time>.yaml (when, every grid point's dev token accuracy, the
           choices) and exp/quick/frozen/merging/current.yaml, a copy of it
    local/merge_freeze.py check --frozen exp/quick/frozen/merging/current.yaml \
        --merges exp/quick/merged/merges.tsv --exp exp/quick
        -> exit status 1 and the reasons, unless every merge of the table (the lambda curve aside) was
           made without a search at its frozen knobs

A re-tune with the same scores and choices writes no new file (local/freeze.py's ``write_frozen``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from freeze import write_frozen
from merge_plan import Merge, read_merges

CRITERION = "best token accuracy on the combined in-domain dev sets (merge_models --search)"


def merge_record(exp: Path, merge: Merge) -> dict[str, Any]:
    path = exp / merge.name / "merge.yaml"
    if not path.is_file():
        raise SystemExit(f"{merge.name} has no merge.yaml: its merge did not finish; run stage 11 again")
    return yaml.safe_load(path.read_text())


def describe(knobs: dict[str, Any]) -> str:
    return " ".join(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in knobs.items()
    )


def choose(merges: list[Merge], exp: Path) -> dict[str, Any]:
    """Every tuning merge's dev grid (knobs -> score) and its chosen knobs, under its ``choice`` (none
    when no algorithm of the merging block has a grid)."""
    scores, choices = {}, {}
    for merge in merges:
        search = merge_record(exp, merge).get("search")
        if not search:
            raise SystemExit(
                f"{merge.name}/merge.yaml records no search: make it with local/merge_plan.py --tune"
            )
        scores[merge.choice] = {
            describe(point["knobs"]): round(float(point["score"]), 4) for point in search["grid"]
        }
        choices[merge.choice] = dict(search["chosen"]["knobs"])
    return {"scores": scores, "choices": choices}


def check(frozen: Path, merges: list[Merge], exp: Path) -> None:
    """Exit with every reason at once unless each merge of the table was made at its frozen knobs."""
    if not frozen.is_file():
        raise SystemExit(f"no frozen merging knobs at {frozen}: run stage 11 (its dev search freezes them)")
    choices = yaml.safe_load(frozen.read_text())["choices"]
    refused = []
    for merge in merges:
        if merge.curve:
            continue
        record = merge_record(exp, merge)
        if record.get("search"):
            refused.append(f"{merge.name}: its knobs were searched when it was made, not taken from {frozen}")
            continue
        wanted = choices.get(merge.choice, {})
        made = {key: record["knobs"].get(key) for key in wanted}
        if made != wanted:
            refused.append(
                f"{merge.name}: made with {describe(made)}, but the knobs frozen on dev for "
                f"{merge.choice} are {describe(wanted)} ({frozen})"
            )
    if refused:
        raise SystemExit(
            "\n".join([*refused, "a test is decoded only for a merge at frozen knobs: run stage 11 again"])
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chooser = commands.add_parser(
        "choose", help="collect the tuning merges' dev grids and freeze the choices"
    )
    chooser.add_argument(
        "--merges", type=Path, required=True, help="the tuning merges (merge_plan.py --tune)"
    )
    chooser.add_argument("--exp", type=Path, required=True)
    chooser.add_argument("--out", type=Path, required=True, help="directory of the frozen files")
    checker = commands.add_parser("check", help="refuse merges not made at their frozen knobs")
    checker.add_argument("--frozen", type=Path, required=True)
    checker.add_argument("--merges", type=Path, required=True)
    checker.add_argument("--exp", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "choose":
        path = write_frozen(choose(read_merges(args.merges), args.exp), args.out, CRITERION)
        print(f"merging knobs frozen: {path}", file=sys.stderr)
    else:
        check(args.frozen, read_merges(args.merges), args.exp)


if __name__ == "__main__":
    main()
