"""The blind protocol of stages 8-9: every method's learning rate is chosen on dev data only and frozen
in a dated file before any test decode, and a test is decoded only for a configuration so frozen.

Tuning runs (``runs.tsv`` lines of sweep ``tune``, value the learning rate; local/finetune_configs.py
--tune): every main method at each rate of the adapters file's ``tuning.lr`` on the ``tuning.domains``
(HDMoLE on all domains together), with the main runs' epochs, scheduler and best-model rule. A run's
dev score is its best validation token accuracy over the epochs (what picks valid.acc.best.pth, from
ESPnet's reporter in checkpoint.pth); a method's score at a rate is the mean over its tuning runs at
that rate, and its choice the best rate (a tie: the smaller rate).

    local/freeze.py choose --runs exp/quick/finetune_conf/runs.tsv --exp exp/quick --out exp/quick/frozen
        -> exp/quick/frozen/<UTC time>.yaml (when, grid, every score, the choices) and
           exp/quick/frozen/current.yaml, a copy of it that stage 8 and the guard read
    local/freeze.py check --frozen exp/quick/frozen/current.yaml --runs runs.tsv --exp exp/quick
        -> exit status 1 and the reasons, unless every run but the tuning ones trained (its own
           config.yaml) at the rate frozen for its method: stage 9's guard before any test decode
    local/freeze.py stale --runs runs.tsv --exp exp/quick
        -> the finished runs whose config.yaml trained at another rate than their planned config now
           asks (stage 8 trains them again)

A re-tune whose scores and choices equal the current file's writes no new file; one that differs
writes a new dated file, so every choice made stays on disk with its date.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean
from typing import Any

import torch
import yaml
from runs import Run, read_runs

TUNE = "tune"
CURRENT = "current.yaml"


def best_dev_accuracy(run_dir: Path) -> float:
    """The best validation token accuracy over the run's epochs (ESPnet's reporter)."""
    checkpoint = run_dir / "checkpoint.pth"
    if not checkpoint.is_file():
        raise SystemExit(f"{run_dir} has no checkpoint.pth: its tuning run did not finish; run stage 8 again")
    stats = torch.load(checkpoint, map_location="cpu", weights_only=False)["reporter"]["stats"]
    accuracies = [epoch["valid"]["acc"] for epoch in stats.values() if "acc" in epoch.get("valid", {})]
    if not accuracies:
        raise SystemExit(f"{checkpoint} holds no validation accuracy; tuning needs valid acc")
    return max(float(value) for value in accuracies)


def choose(runs: list[Run], exp: Path) -> dict[str, Any]:
    """Scores per method and rate, and the chosen rate of every method, from the tuning runs."""
    scores: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.sweep == TUNE:
            scores[run.method][float(run.value)].append(best_dev_accuracy(exp / run.name))
    if not scores:
        raise SystemExit("runs.tsv has no tuning runs: plan them with local/finetune_configs.py --tune")
    table = {
        method: {rate: round(mean(values), 4) for rate, values in sorted(by_rate.items())}
        for method, by_rate in scores.items()
    }
    choices = {
        method: max(by_rate, key=lambda rate: (by_rate[rate], -rate)) for method, by_rate in table.items()
    }
    return {"scores": table, "choices": choices}


def write_frozen(record: dict[str, Any], out: Path, criterion: str = "best valid acc") -> Path:
    """``<out>/<UTC time>.yaml`` and its copy ``<out>/current.yaml`` (written whole, then renamed); the
    same scores and choices as the current file's write nothing new."""
    current = out / CURRENT
    if current.is_file():
        previous = yaml.safe_load(current.read_text())
        if (previous.get("scores"), previous.get("choices")) == (record["scores"], record["choices"]):
            return out / previous["file"]
    made = datetime.now(UTC)
    path = out / f"{made.strftime('%Y%m%dT%H%M%SZ')}.yaml"
    record = {"made": made.isoformat(timespec="seconds"), "file": path.name, "criterion": criterion, **record}
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{path.name}.tmp"
    staging.write_text(yaml.safe_dump(record, sort_keys=False))
    staging.replace(path)
    shutil.copyfile(path, staging)
    staging.replace(out / CURRENT)
    return path


def frozen_rate(frozen: Path, method: str) -> float:
    if not frozen.is_file():
        raise SystemExit(
            f"no frozen learning rates at {frozen}: run stage 8 with --tune true (choices on dev), or give "
            "--frozen with a file it wrote"
        )
    choices = yaml.safe_load(frozen.read_text())["choices"]
    if method not in choices:
        raise SystemExit(f"{frozen} has no frozen rate for {method}: run stage 8 with --tune true again")
    return float(choices[method])


def learning_rate(config: Path) -> float:
    return float(yaml.safe_load(config.read_text())["optim_conf"]["lr"])


def check(frozen: Path, method: str, config: Path) -> None:
    """Exit with the reason unless ``config`` trains at the rate frozen for ``method``."""
    rate = frozen_rate(frozen, method)
    trained = learning_rate(config)
    if trained != rate:
        raise SystemExit(
            f"{config} trains {method} at lr {trained:g}, but the rate frozen on dev for it is {rate:g} "
            f"({frozen}); a test is decoded only for a frozen configuration: run stage 8 again"
        )


def check_runs(frozen: Path, runs: list[Run], exp: Path) -> None:
    """``check`` of every run but the tuning ones, on the config.yaml it trained with; all refusals
    at once."""
    refused = []
    for run in runs:
        if run.sweep == TUNE:
            continue
        try:
            check(frozen, run.method, exp / run.name / "config.yaml")
        except SystemExit as refusal:
            refused.append(f"{run.name}: {refusal}")
    if refused:
        raise SystemExit("\n".join(refused))


def stale_runs(runs: list[Run], exp: Path) -> list[str]:
    """Finished runs whose config.yaml trained at another rate than their planned config asks."""
    return [
        run.name
        for run in runs
        if (exp / run.name / "train_stats.json").is_file()
        and learning_rate(exp / run.name / "config.yaml") != learning_rate(Path(run.config))
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chooser = commands.add_parser("choose", help="score the tuning runs and freeze the choices")
    chooser.add_argument("--runs", type=Path, required=True)
    chooser.add_argument("--exp", type=Path, required=True)
    chooser.add_argument("--out", type=Path, required=True, help="directory of the frozen files")
    checker = commands.add_parser("check", help="refuse runs trained at a rate that was not frozen")
    checker.add_argument("--frozen", type=Path, required=True)
    checker.add_argument("--runs", type=Path, required=True)
    checker.add_argument("--exp", type=Path, required=True)
    stale = commands.add_parser("stale", help="print the finished runs trained at another rate")
    stale.add_argument("--runs", type=Path, required=True)
    stale.add_argument("--exp", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "choose":
        path = write_frozen(choose(read_runs(args.runs), args.exp), args.out)
        print(yaml.safe_dump(yaml.safe_load(path.read_text()), sort_keys=False), end="")
        print(f"frozen: {path}", file=sys.stderr)
    elif args.command == "check":
        check_runs(args.frozen, read_runs(args.runs), args.exp)
    else:
        print("\n".join(stale_runs(read_runs(args.runs), args.exp)))


if __name__ == "__main__":
    main()
