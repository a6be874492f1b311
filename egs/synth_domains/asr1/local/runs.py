"""The list of fine-tuning runs of stages 8-10 (``runs.tsv``), one tab-separated line per run:

    run  method  sweep  value  config  train-data  dev-data  test-domains

``run`` is its dir under exp (``<domain>/<method>[@<variant>]``, or ``all/<method>`` for a run on
every domain together); ``sweep`` is ``main``, ``seed`` (a main or joint run at another seed,
``<run>@seed<i>``),
``tune`` (local/freeze.py), ``joint`` (a joint run for the merging stages), ``budget``, ``split``,
``allocation`` or ``fewshot``, ``value`` the swept value (the seed's index for ``seed``; ``-`` for main
runs: bash's ``read`` would merge empty tab-separated fields); ``test-domains`` is space-separated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SWEEPS = ("budget", "split", "allocation", "fewshot")
SEED = "seed"
SEED_SUFFIX = "@seed"


@dataclass(frozen=True)
class Run:
    """One fine-tuning: its dir under exp (also its name), and what it trains and tests on."""

    name: str
    method: str
    sweep: str
    value: str
    config: str
    train: str
    dev: str
    tests: list[str]

    def line(self) -> str:
        fields = (self.name, self.method, self.sweep, self.value, self.config, self.train, self.dev)
        return "\t".join((*fields, " ".join(self.tests))) + "\n"


def seeded_from(run: Run) -> str:
    """The run a seed run repeats (its name without ``@seed<i>``); a run's own name otherwise."""
    return run.name.rsplit(SEED_SUFFIX, 1)[0] if run.sweep == SEED else run.name


def seed_index(run: Run) -> int:
    """0 for a main or joint run, i for its ``@seed<i>`` repeat."""
    return int(run.value) if run.sweep == SEED else 0


def write_runs(path: Path, runs: list[Run]) -> None:
    path.write_text("".join(run.line() for run in runs))


def read_runs(path: Path) -> list[Run]:
    runs = []
    for line in path.read_text().splitlines():
        *fields, tests = line.split("\t")
        runs.append(Run(*fields, tests.split()))
    return runs
