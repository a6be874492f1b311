"""Stage 11 set-up: which merges the merging stages make, from the ``merging`` block of the adapters
file and the per-domain runs of stage 8.

Each merge takes the per-domain runs of one kind (``full``, or one PEFT method: its adapters) at one
seed on every target domain and writes one model for all of them with
``espnet_plugins.bin.merge_models`` (feature-fusion rows are not merged: each has its own head over
the encoder and its own decoder):

- ``merged/full/<algorithm>``: the full fine-tunes, every algorithm of ``merging.full``;
- ``merged/<method>/<algorithm>``: each PEFT method's adapters (HDMoLE aside: one model already),
  every algorithm of ``merging.adapters`` and the method's ``merging.adapter_extra``, folded into
  the base (a plain ESPnet model);
- ``merged/<method>/<algorithm>@core``: SSVD-family adapters (``merging.kept_as_adapter``) merged in
  their shared subspace and kept as an ``ssvd_core`` adapter of the same k;
- ``merged/full/<algorithm>@scaling<v>``: the full fine-tunes at every scaling of the grid, for the
  algorithms of ``merging.lambda_curve`` (the in-domain vs out-of-distribution curve across lambda, a
  sweep on the test sets: nothing is chosen from it, and no row of the table comes from it).

An algorithm is a merge method with fixed knobs and a grid: ``scaling`` (the shared lambda grid of
``merging.scaling``, for every method that has the knob) and the algorithm's own ``search``. The blind
protocol, as for the learning rates (local/freeze.py):

- ``--tune``: the tuning merges ``merged/tune/<kind>/<algorithm>[@core]``, one per algorithm with a
  grid, of the seed-0 runs, each searching its grid on the combined in-domain dev sets by token
  accuracy (``merge_models --search``); local/merge_freeze.py writes their choices to a dated frozen
  file. They are never decoded on a test.
- ``--frozen F --seeds n``: the merges the table reports, every algorithm at the knobs frozen in F (no
  search), at every seed: ``<merge>`` of the seed-0 runs and ``<merge>@seed<i>`` of the runs'
  ``@seed<i>`` repeats; the lambda curve at seed 0.

One line per merge, tab-separated: name, kind, algorithm, form (``model`` or ``ssvd_core``), seed, the
merge's options for ``merge_models`` (after ``--base_dir`` and ``--output_dir``; shell-quoted) and its
input model files (space-separated: a merge older than one of them is made again).
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from runs import SEED, SEED_SUFFIX, Run, read_runs, seed_index

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.merging.adapters import SUBSPACE_METHODS
from ssvd_peft.merging.registry import get_merge_method
from ssvd_peft.registry import get_method, method_names

FULL = "full"
MODEL_FORM = "model"
CORE_FORM = "ssvd_core"
CORE_SUFFIX = "@core"
SCALING = "scaling"
TUNE_DIR = "merged/tune"
MODEL_FILE = "valid.acc.best.pth"  # what stage 9 decodes of every run
CURVE = re.compile(rf"@{SCALING}([0-9.eE+-]+)$")


def routes_domains(method: str) -> bool:
    """A method with a model part (HDMoLE's domain router) serves every domain with one model
    already: its runs are compared, not merged."""
    return get_method(method).model_part is not None


@dataclass(frozen=True)
class Merge:
    """One merge: its dir under exp, the kind of inputs, the algorithm, the output form, the seed of its
    inputs and the options of ``espnet_plugins.bin.merge_models`` that make it."""

    name: str
    kind: str
    algorithm: str
    form: str
    seed: int
    options: list[str]
    inputs: list[str]

    @property
    def choice(self) -> str:
        """What its knobs are frozen under: ``<kind>/<algorithm>`` (``@core``: kept as an adapter)."""
        return f"{self.kind}/{self.algorithm}" + (CORE_SUFFIX if self.form == CORE_FORM else "")

    @property
    def curve(self) -> bool:
        """A point of the lambda curve (a sweep on the tests: not chosen, not a row of the table)."""
        return CURVE.search(self.name) is not None

    @property
    def system(self) -> str:
        """Its seed-0 merge's name: the row of the table it is a seed of."""
        return self.name.rsplit(SEED_SUFFIX, 1)[0]

    def line(self) -> str:
        fields = (
            self.name,
            self.kind,
            self.algorithm,
            self.form,
            str(self.seed),
            shlex.join(self.options),
            " ".join(self.inputs),
        )
        return "\t".join(fields) + "\n"


def read_merges(path: Path) -> list[Merge]:
    merges = []
    for line in path.read_text().splitlines():
        name, kind, algorithm, form, seed, options, inputs = line.split("\t")
        merges.append(Merge(name, kind, algorithm, form, int(seed), shlex.split(options), inputs.split()))
    return merges


class MergePlanner:
    """The merges of the ``merging`` block (see the module docstring)."""

    def __init__(self, merging: dict[str, Any], runs: list[Run], domains: list[str], exp: Path, dev: Path):
        self.merging, self.domains, self.exp, self.dev = merging, domains, exp, dev
        self.algorithms: dict[str, dict[str, Any]] = merging.get("algorithms") or {}
        self.scaling = [float(value) for value in merging.get(SCALING) or []]
        mergeable = {FULL, *method_names()}
        self.per_domain = {
            (run.method, run.tests[0], seed_index(run)): run
            for run in runs
            if run.sweep in ("main", SEED)
            and len(run.tests) == 1
            and run.method in mergeable
            and not run.name.startswith("all/")
        }
        self.methods = sorted({method for method, _, _ in self.per_domain} - {FULL})
        self.frozen: dict[str, dict[str, Any]] | None = None  # choice -> knobs frozen on dev (--frozen)

    def algorithm(self, name: str) -> tuple[str, dict[str, Any], dict[str, list[Any]]]:
        """(merge method, fixed knobs, grid) of an algorithm; unknown names and knobs are refused here."""
        if name not in self.algorithms:
            raise SystemExit(
                f"merging: algorithm {name!r} is not in merging.algorithms ({', '.join(self.algorithms)})"
            )
        spec = self.algorithms[name]
        knobs = dict(spec.get("knobs") or {})
        grid = {key: list(values) for key, values in (spec.get("search") or {}).items()}
        try:
            method = get_merge_method(spec["method"])
            if SCALING in method.knobs and SCALING not in knobs and self.scaling:
                grid = {SCALING: self.scaling, **grid}
            method.resolved_knobs({**knobs, **{key: values[0] for key, values in grid.items()}})
        except PeftConfigError as error:
            raise SystemExit(f"merging.algorithms.{name}: {error}") from None
        return method.name, knobs, grid

    def inputs(self, kind: str, seed: int = 0) -> list[str]:
        """The run dirs of ``kind`` at ``seed``, one per target domain."""
        missing = [domain for domain in self.domains if (kind, domain, seed) not in self.per_domain]
        if missing:
            raise SystemExit(
                f"merging {kind} at seed {seed}: no {kind} run on {', '.join(missing)} in runs.tsv; add "
                f"{kind} to --methods (and run as many --seeds as the merges)"
            )
        return [str(self.exp / self.per_domain[kind, domain, seed].name) for domain in self.domains]

    def merge(
        self,
        name: str,
        kind: str,
        algorithm: str,
        form: str = MODEL_FORM,
        knobs: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> Merge:
        """A merge of the seed's runs: the algorithm's fixed knobs and ``knobs`` set, the rest of its grid
        searched on dev."""
        method, fixed, grid = self.algorithm(algorithm)
        fixed = {**fixed, **(knobs or {})}
        grid = {key: values for key, values in grid.items() if key not in fixed}
        inputs = self.inputs(kind, seed)
        options = ["--method", method, "--exp_dirs", *inputs, "--model_file", MODEL_FILE]
        options += [item for key, value in fixed.items() for item in ("--knob", f"{key}={value}")]
        if grid:
            options += [
                item
                for key, values in grid.items()
                for item in ("--search", f"{key}={','.join(map(str, values))}")
            ]
            options += [
                "--dev_data",
                f"{self.dev}/wav.scp,speech,sound",
                "--dev_data",
                f"{self.dev}/text,text,text",
            ]
        if form == CORE_FORM:
            options += ["--as_adapter", CORE_FORM]
        inputs = [f"{run}/{MODEL_FILE}" for run in inputs]
        return Merge(name, kind, algorithm, form, seed, options, inputs)

    def systems(self) -> list[tuple[str, str, str]]:
        """(kind, algorithm, form) of every merge the table reports."""
        systems = [(FULL, a, MODEL_FORM) for a in self.merging.get(FULL) or []]
        extra = self.merging.get("adapter_extra") or {}
        for method in self.methods:
            if routes_domains(method):
                continue
            for algorithm in [*(self.merging.get("adapters") or []), *extra.get(method, [])]:
                systems.append((method, algorithm, MODEL_FORM))
        for method, algorithms in (self.merging.get("kept_as_adapter") or {}).items():
            if method not in self.methods:
                continue
            if method not in SUBSPACE_METHODS:
                raise SystemExit(
                    f"merging.kept_as_adapter: {method} adapters have no shared subspace to merge in; "
                    f"list SSVD-family methods only ({', '.join(SUBSPACE_METHODS)})"
                )
            systems += [(method, algorithm, CORE_FORM) for algorithm in algorithms]
        return systems

    @staticmethod
    def system_name(kind: str, algorithm: str, form: str) -> str:
        return f"{kind}/{algorithm}" + (CORE_SUFFIX if form == CORE_FORM else "")

    def tuning(self) -> list[Merge]:
        """The tuning merges: every system whose algorithm has a grid, seed 0, its grid searched on dev."""
        return [
            self.merge(f"{TUNE_DIR}/{self.system_name(*system)}", *system)
            for system in self.systems()
            if self.algorithm(system[1])[2]
        ]

    def frozen_knobs(self, kind: str, algorithm: str, form: str) -> dict[str, Any]:
        """The knobs frozen on dev for a system (none for an algorithm without a grid)."""
        if not self.algorithm(algorithm)[2]:
            return {}
        choice = self.system_name(kind, algorithm, form)
        if self.frozen is None or choice not in self.frozen:
            raise SystemExit(
                f"merging: no knobs frozen on dev for {choice}: run stage 11 with --tune true (the tuning "
                "merges choose them on the dev sets before any test decode)"
            )
        return self.frozen[choice]

    def plan(self, seeds: int) -> list[Merge]:
        """Every system at its frozen knobs at each seed, then the lambda curve (seed 0)."""
        merges = []
        for system in self.systems():
            knobs = self.frozen_knobs(*system)
            name = f"merged/{self.system_name(*system)}"
            for seed in range(seeds):
                merged = name if seed == 0 else f"{name}{SEED_SUFFIX}{seed}"
                merges.append(self.merge(merged, *system, knobs=knobs, seed=seed))
        for algorithm in self.merging.get("lambda_curve") or []:
            for value in self.scaling:
                name = f"merged/{FULL}/{algorithm}@{SCALING}{value:g}"
                merges.append(self.merge(name, FULL, algorithm, knobs={SCALING: value}))
        return merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=Path, required=True, help="adapters file with a merging block")
    parser.add_argument("--runs", type=Path, required=True, help="runs.tsv of stage 8")
    parser.add_argument("--domains", required=True, help="space-separated target domains")
    parser.add_argument("--exp", type=Path, required=True, help="experiment dir of the profile")
    parser.add_argument("--dev", type=Path, required=True, help="the combined in-domain dev data dir")
    parser.add_argument("--out", type=Path, required=True, help="the merges file to write")
    plan = parser.add_mutually_exclusive_group(required=True)
    plan.add_argument("--tune", action="store_true", help="the tuning merges (knobs searched on dev)")
    plan.add_argument("--frozen", type=Path, help="knobs frozen on dev (local/merge_freeze.py): the merges")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the merges (each seed's runs)")
    args = parser.parse_args()
    merging = (yaml.safe_load(args.adapters.read_text()) or {}).get("merging")
    if not merging:
        raise SystemExit(f"{args.adapters} has no merging block: the merging stages have nothing to do")
    planner = MergePlanner(merging, read_runs(args.runs), args.domains.split(), args.exp, args.dev)
    if args.tune:
        merges = planner.tuning()
    else:
        if not args.frozen.is_file():
            raise SystemExit(f"no frozen merging knobs at {args.frozen}: run stage 11 with --tune true")
        planner.frozen = yaml.safe_load(args.frozen.read_text())["choices"]
        merges = planner.plan(args.seeds)
    staging = args.out.with_name(f".{args.out.name}.tmp")
    staging.write_text("".join(merge.line() for merge in merges))
    staging.replace(args.out)
    print(f"{len(merges)} merges -> {args.out}")


if __name__ == "__main__":
    main()
