"""Stage 11 set-up: which merges the merging stages make (``merges.tsv``), from the ``merging`` block of
the adapters file and the per-domain runs of stage 8.

Each merge takes the per-domain main runs of one kind (``full``, or one PEFT method: its adapters) on
every target domain and writes one model for all of them with ``espnet_plugins.bin.merge_models``
(feature-fusion rows are not merged: each has its own head over the encoder and its own decoder):

- ``merged/full/<algorithm>``: the full fine-tunes, every algorithm of ``merging.full``;
- ``merged/<method>/<algorithm>``: each PEFT method's adapters (HDMoLE aside: one model already),
  every algorithm of ``merging.adapters`` and the method's ``merging.adapter_extra``, folded into
  the base (a plain ESPnet model);
- ``merged/<method>/<algorithm>@core``: SSVD-family adapters (``merging.kept_as_adapter``) merged in
  their shared subspace and kept as an ``ssvd_core`` adapter of the same k;
- ``merged/full/<algorithm>@scaling<v>``: the full fine-tunes at every scaling of the grid, for the
  algorithms of ``merging.lambda_curve`` (the in-domain vs out-of-distribution curve across lambda;
  nothing is chosen from them).

An algorithm is a merge method with fixed knobs and a grid: ``scaling`` (the shared lambda grid of
``merging.scaling``, for every method that has the knob) and the algorithm's own ``search``; the grid
is searched on the combined in-domain dev sets by token accuracy (``--search``) before any test
decode. One line per merge, tab-separated: name, kind, algorithm, form (``model`` or ``ssvd_core``),
the merge's options for ``merge_models`` (after ``--base_dir`` and ``--output_dir``; shell-quoted) and
its input model files (space-separated: a merge older than one of them is made again).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from runs import Run, read_runs

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.merging.adapters import SUBSPACE_METHODS
from ssvd_peft.merging.registry import get_merge_method
from ssvd_peft.registry import get_method, method_names

FULL = "full"
MODEL_FORM = "model"
CORE_FORM = "ssvd_core"
SCALING = "scaling"
MODEL_FILE = "valid.acc.best.pth"  # what stage 9 decodes of every run


def routes_domains(method: str) -> bool:
    """A method with a model part (HDMoLE's domain router) serves every domain with one model
    already: its runs are compared, not merged."""
    return get_method(method).model_part is not None


@dataclass(frozen=True)
class Merge:
    """One merge: its dir under exp, the kind of inputs, the algorithm, the output form and the options
    of ``espnet_plugins.bin.merge_models`` that make it."""

    name: str
    kind: str
    algorithm: str
    form: str
    options: list[str]
    inputs: list[str]

    def line(self) -> str:
        fields = (
            self.name,
            self.kind,
            self.algorithm,
            self.form,
            shlex.join(self.options),
            " ".join(self.inputs),
        )
        return "\t".join(fields) + "\n"


def read_merges(path: Path) -> list[Merge]:
    merges = []
    for line in path.read_text().splitlines():
        name, kind, algorithm, form, options, inputs = line.split("\t")
        merges.append(Merge(name, kind, algorithm, form, shlex.split(options), inputs.split()))
    return merges


class MergePlanner:
    """The merges of the ``merging`` block (see the module docstring)."""

    def __init__(self, merging: dict[str, Any], runs: list[Run], domains: list[str], exp: Path, dev: Path):
        self.merging, self.domains, self.exp, self.dev = merging, domains, exp, dev
        self.algorithms: dict[str, dict[str, Any]] = merging.get("algorithms") or {}
        self.scaling = [float(value) for value in merging.get(SCALING) or []]
        mergeable = {FULL, *method_names()}
        self.per_domain = {
            (run.method, run.tests[0]): run
            for run in runs
            if run.sweep == "main" and len(run.tests) == 1 and run.method in mergeable
        }
        self.methods = sorted({method for method, _ in self.per_domain} - {FULL})

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

    def inputs(self, kind: str) -> list[str]:
        """The per-domain run dirs of ``kind``, one per target domain."""
        missing = [domain for domain in self.domains if (kind, domain) not in self.per_domain]
        if missing:
            raise SystemExit(
                f"merging {kind}: no {kind} run on {', '.join(missing)} in runs.tsv; add {kind} to --methods"
            )
        return [str(self.exp / self.per_domain[kind, domain].name) for domain in self.domains]

    def merge(
        self,
        name: str,
        kind: str,
        algorithm: str,
        form: str = MODEL_FORM,
        knobs: dict[str, Any] | None = None,
    ) -> Merge:
        method, fixed, grid = self.algorithm(algorithm)
        fixed = {**fixed, **(knobs or {})}
        grid = {key: values for key, values in grid.items() if key not in fixed}
        inputs = self.inputs(kind)
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
        return Merge(name, kind, algorithm, form, options, [f"{run}/{MODEL_FILE}" for run in inputs])

    def plan(self) -> list[Merge]:
        merges = [self.merge(f"merged/{FULL}/{a}", FULL, a) for a in self.merging.get(FULL) or []]
        extra = self.merging.get("adapter_extra") or {}
        for method in self.methods:
            if routes_domains(method):
                continue
            for algorithm in [*(self.merging.get("adapters") or []), *extra.get(method, [])]:
                merges.append(self.merge(f"merged/{method}/{algorithm}", method, algorithm))
        for method, algorithms in (self.merging.get("kept_as_adapter") or {}).items():
            if method not in self.methods:
                continue
            if method not in SUBSPACE_METHODS:
                raise SystemExit(
                    f"merging.kept_as_adapter: {method} adapters have no shared subspace to merge in; "
                    f"list SSVD-family methods only ({', '.join(SUBSPACE_METHODS)})"
                )
            for algorithm in algorithms:
                merges.append(self.merge(f"merged/{method}/{algorithm}@core", method, algorithm, CORE_FORM))
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
    parser.add_argument("--out", type=Path, required=True, help="merges.tsv to write")
    args = parser.parse_args()
    merging = (yaml.safe_load(args.adapters.read_text()) or {}).get("merging")
    if not merging:
        raise SystemExit(f"{args.adapters} has no merging block: the merging stages have nothing to do")
    planner = MergePlanner(merging, read_runs(args.runs), args.domains.split(), args.exp, args.dev)
    merges = planner.plan()
    args.out.write_text("".join(merge.line() for merge in merges))
    print(f"{len(merges)} merges -> {args.out}")


if __name__ == "__main__":
    main()
