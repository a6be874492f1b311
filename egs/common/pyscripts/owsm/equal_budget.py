#!/usr/bin/env python3
"""Stage 3 set-up: every method's peft block at one budget of trainable parameters on the OWSM model.

    --budget N        every method's rank or k chosen for N trainable parameters
    --budget METHOD   N = what METHOD's block trains as written (that block stays as written)
    --budget none     every block as written (no matching)

For each method of --methods, ``<peft_conf_dir>/<method>.yaml`` with its knob (rank for LoRA, DoRA
and PiSSA; k, one value on every layer, for SSVD and SSVD-O; it replaces k_ratio) set to the value
whose trainable count on the model is closest to N (``ssvd_peft.budget.equal_budget_configs``; the
model is built on the meta device from the OWSM config, so nothing is loaded). Every other option,
alpha included, stays as the block writes it. A budget that no value of a method's knob comes within
one step of is refused, with the closest count. Writes ``<out_dir>/<method>.yaml`` and
``<out_dir>/budget.csv`` (method, knob, value, trainable, budget, sweep, point).

``--sweeps "budget split allocation"`` adds the sweeps of ``--sweeps_conf`` (default
``egs/common/owsm/conf/sweeps.yaml``, which documents them): each point changes one main method's
block and is written as one more run, ``<out_dir>/<run>.yaml`` and a budget.csv row whose method is
the run name (``lora@x4``, ``ssvd_o@outer0.5``, ``lora@encoder``), sweep its sweep and point its
value (main runs: sweep ``main``, point ``-``). budget points are matched at factor x N, allocation
points (one part of the model) at N, split points keep the main ssvd_o block's k and change its
outer_share. A sweep the file lacks, a sweep method not in --methods, --budget none, or a budget
out of a point's reach is refused before anything is written.

A method that routes among domains (its config has ``domains``: HDMoLE) gets them from
``--utt2domain`` (the training set's; names sorted, ``num_domains`` their count) before its knob
is matched; fewer than two domains are refused. The count in budget.csv is the adapter layers';
HDMoLE's domain router adds M (d + 1) on top (d: the width of its features).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from espnet_plugins.modules import build_meta_model
from ssvd_peft.budget import equal_budget_configs, estimate_budget
from ssvd_peft.config import PeftConfigError
from ssvd_peft.methods.hdmole import UNLABELLED
from ssvd_peft.registry import get_method

# The options a matched knob replaces (SSVD's k_ratio sizes k when k is not given).
KNOB_ALIASES = {"k": ("k_ratio",)}
COLUMNS = ("method", "knob", "value", "trainable", "budget", "sweep", "point")
MAIN = "main"  # the sweep column of the main runs
SWEEPS_CONF = Path(__file__).resolve().parents[2] / "owsm" / "conf" / "sweeps.yaml"


class BudgetError(Exception):
    """A budget or peft block that cannot be matched; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One extra run of a sweep: a main method's block with ``overrides`` over its peft_conf.

    ``name`` is the run name (``<method>@<label>``), ``point`` the point's value as the sweeps file
    writes it; the knob is matched at ``budget_factor`` x the main budget, or kept as the main
    block has it when ``matched`` is False (the split sweep).
    """

    name: str
    sweep: str
    point: str
    method: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    budget_factor: float = 1.0
    matched: bool = True


def read_block(peft_conf_dir: Path, method: str) -> dict[str, Any]:
    path = peft_conf_dir / f"{method}.yaml"
    if not path.is_file():
        raise BudgetError(f"no peft block {path} for method {method}")
    block = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(block, dict) or "peft" not in block:
        raise BudgetError(f"{path} must hold a peft block (peft: <method>, peft_conf: ...)")
    return block


def domains_of(utt2domain: Path) -> list[str]:
    """The domain names of a Kaldi-style utt2domain file, sorted (unlabelled utterances left out)."""
    if not utt2domain.is_file():
        raise BudgetError(f"no {utt2domain}: run stage 1 (it writes utt2domain beside text)")
    names = {line.split()[1] for line in utt2domain.read_text(encoding="utf-8").splitlines() if line.strip()}
    return sorted(names - {UNLABELLED})


def routes_domains(method: str) -> bool:
    """Whether the method's config takes domain names (a domain router)."""
    return "domains" in {field.name for field in dataclasses.fields(get_method(method).config)}


def with_domains(block: dict[str, Any], utt2domain: Path | None, name: str) -> dict[str, Any]:
    """``block`` with ``domains`` and ``num_domains`` from the training set's utt2domain, if its method
    routes among domains; other blocks as they are."""
    if not routes_domains(block["peft"]):
        return block
    if utt2domain is None:
        raise BudgetError(f"{name} routes among domains: give --utt2domain (the training set's utt2domain)")
    domains = domains_of(utt2domain)
    if len(domains) < 2:
        raise BudgetError(
            f"{name} routes among domains, but the training set's utt2domain names "
            f"{len(domains)} ({', '.join(domains) or '-'}): it needs two or more; leave {name} out of "
            "--methods for this corpus"
        )
    return {
        **block,
        "peft_conf": {**(block.get("peft_conf") or {}), "num_domains": len(domains), "domains": domains},
    }


def budget_of(model: Any, spec: str, peft_conf_dir: Path) -> tuple[int, str]:
    """(N, the reference method or "") of --budget ``spec``: a count or a method's block as written."""
    if spec.isdigit():
        if int(spec) <= 0:
            raise BudgetError(f"--budget {spec}: give a positive number of trainable parameters")
        return int(spec), ""
    block = read_block(peft_conf_dir, spec)
    try:
        return estimate_budget(model, block["peft"], **(block.get("peft_conf") or {})).trainable, spec
    except (PeftConfigError, TypeError) as error:
        raise BudgetError(f"--budget {spec}: {peft_conf_dir / f'{spec}.yaml'}: {error}") from None


def matched_block(model: Any, block: dict[str, Any], budget: int, name: str) -> tuple[dict[str, Any], dict]:
    """``block`` with its method's knob at the value closest to ``budget``, and its budget.csv row."""
    method = block["peft"]
    knob = get_method(method).knob
    options = dict(block.get("peft_conf") or {})
    for key in (knob, *KNOB_ALIASES.get(knob, ())):
        options.pop(key, None)
    try:
        match = equal_budget_configs(model, budget, {method: options}, strict=True)[method]
    except PeftConfigError as error:
        raise BudgetError(f"{name}: {error}") from None
    peft_conf = {**options, knob: match.value}
    row = {"method": name, "knob": knob, "value": match.value, "trainable": match.trainable, "budget": budget}
    return {**block, "peft_conf": peft_conf}, row


def knob_setting(method: str, options: dict[str, Any]) -> tuple[str, Any]:
    """(knob, value) of a peft block: its method's knob, or the option that sizes it instead (SSVD's
    k_ratio); the value "-" when the block leaves both at their defaults."""
    knob = get_method(method).knob
    written = [key for key in (knob, *KNOB_ALIASES.get(knob, ())) if key in options]
    knob = written[0] if written else knob
    return knob, options.get(knob, "-")


def as_written_row(model: Any, block: dict[str, Any], name: str, budget: int) -> dict[str, Any]:
    """The budget.csv row of a block kept as written."""
    options = block.get("peft_conf") or {}
    knob, value = knob_setting(block["peft"], options)
    trainable = estimate_budget(model, block["peft"], **options).trainable
    return {"method": name, "knob": knob, "value": value, "trainable": trainable, "budget": budget or "-"}


def write_blocks(
    config: Path,
    peft_conf_dir: Path,
    methods: list[str],
    spec: str,
    out_dir: Path,
    utt2domain: Path | None = None,
    points: list[SweepPoint] | None = None,
) -> list[dict[str, Any]]:
    """Write every method's block (matched, or as written) and every sweep point's into ``out_dir``;
    the budget.csv rows. Nothing is written when one of them cannot be made."""
    if points and spec == "none":
        raise BudgetError("--sweeps: a sweep is set at the main budget; give --budget a method or a number")
    model = build_meta_model(config, "s2t")
    budget, reference = (0, "") if spec == "none" else budget_of(model, spec, peft_conf_dir)
    blocks, rows = {}, []
    for method in methods:
        block = with_domains(read_block(peft_conf_dir, method), utt2domain, method)
        if spec == "none" or method == reference:
            row = as_written_row(model, block, method, budget)
        else:
            block, row = matched_block(model, block, budget, method)
        blocks[method] = block
        rows.append({**row, "sweep": MAIN, "point": "-"})
    extra_blocks, extra_rows = sweep_blocks(model, blocks, points or [], budget)
    write_outputs(out_dir, {**blocks, **extra_blocks}, rows + extra_rows)
    return rows + extra_rows


def sweep_items(spec: Any, key: str, where: str) -> list[Any]:
    """The non-empty list ``spec[key]`` of a sweep's mapping ``spec``."""
    items = spec.get(key) if isinstance(spec, dict) else None
    if not isinstance(items, list) or not items:
        raise BudgetError(f"{where}: give {key} as a non-empty list")
    return items


def budget_points(spec: dict[str, Any], where: str) -> list[SweepPoint]:
    """budget: every method at every factor x the main budget (``<method>@x<factor>``)."""
    methods, points = sweep_items(spec, "methods", where), []
    for factor in sweep_items(spec, "factors", where):
        if isinstance(factor, bool) or not isinstance(factor, int | float) or factor <= 0:
            raise BudgetError(f"{where}: a factor must be a positive number, got {factor!r}")
        points += [
            SweepPoint(f"{method}@x{factor}", "budget", f"x{factor}", method, budget_factor=factor)
            for method in methods
        ]
    return points


def split_points(spec: dict[str, Any], where: str) -> list[SweepPoint]:
    """split: the main block of ``method`` (ssvd_o) at its own k with each outer_share."""
    method = spec.get("method") if isinstance(spec, dict) else None
    if not isinstance(method, str):
        raise BudgetError(f"{where}: give the method whose outer_share varies (method: ssvd_o)")
    return [
        SweepPoint(f"{method}@outer{rho}", "split", str(rho), method, {"outer_share": rho}, matched=False)
        for rho in sweep_items(spec, "outer_share", where)
    ]


def allocation_points(spec: dict[str, Any], where: str) -> list[SweepPoint]:
    """allocation: every method adapting one part of the model (its options over the main block's)
    at the main budget (``<method>@<part>``)."""
    parts = spec.get("parts") if isinstance(spec, dict) else None
    if not isinstance(parts, dict) or not parts:
        raise BudgetError(f"{where}: give parts as a mapping {{part: {{option: value}}}}")
    methods, points = sweep_items(spec, "methods", where), []
    for part, overrides in parts.items():
        if not isinstance(overrides, dict) or not overrides:
            raise BudgetError(f"{where}: part {part} must map options to values, got {overrides!r}")
        points += [SweepPoint(f"{m}@{part}", "allocation", str(part), m, overrides) for m in methods]
    return points


SWEEP_KINDS: dict[str, Callable[[dict[str, Any], str], list[SweepPoint]]] = {
    "budget": budget_points,
    "split": split_points,
    "allocation": allocation_points,
}


def sweep_points(sweeps_conf: Path, names: list[str]) -> list[SweepPoint]:
    """The points of the sweeps ``names`` of the sweeps file, in that order; each run name once."""
    if not names:
        return []
    if not sweeps_conf.is_file():
        raise BudgetError(f"no sweeps file {sweeps_conf} (--sweeps_conf)")
    sweeps = yaml.safe_load(sweeps_conf.read_text(encoding="utf-8"))
    if not isinstance(sweeps, dict):
        raise BudgetError(f"{sweeps_conf} must map sweep names to their points")
    points: list[SweepPoint] = []
    for name in names:
        if name not in sweeps:
            raise BudgetError(
                f"--sweeps {name}: no sweep {name!r} in {sweeps_conf} (it has {', '.join(sweeps) or '-'})"
            )
        if name not in SWEEP_KINDS:
            raise BudgetError(f"--sweeps {name}: known sweeps are {', '.join(SWEEP_KINDS)}")
        points += SWEEP_KINDS[name](sweeps[name], f"{sweeps_conf}: {name}")
    repeated = sorted(name for name, count in Counter(point.name for point in points).items() if count > 1)
    if repeated:
        raise BudgetError(f"--sweeps {' '.join(names)}: run names {', '.join(repeated)} come twice")
    return points


def sweep_block(
    model: Any, main_block: dict[str, Any], point: SweepPoint, budget: int
) -> tuple[dict[str, Any], dict]:
    """The block of a sweep point (its overrides over the main block, matched or with the main
    block's knob) and its budget.csv row."""
    block = {**main_block, "peft_conf": {**(main_block.get("peft_conf") or {}), **point.overrides}}
    try:
        if point.matched:
            block, row = matched_block(model, block, round(point.budget_factor * budget), point.name)
        else:
            row = as_written_row(model, block, point.name, budget)
    except (PeftConfigError, TypeError) as error:
        raise BudgetError(f"{point.name}: {error}") from None
    return block, {**row, "sweep": point.sweep, "point": point.point}


def sweep_blocks(
    model: Any, blocks: dict[str, dict[str, Any]], points: list[SweepPoint], budget: int
) -> tuple[dict[str, dict[str, Any]], list[dict]]:
    """The blocks and budget.csv rows of every sweep point, from the main ``blocks``."""
    out, rows = {}, []
    for point in points:
        if point.method not in blocks:
            raise BudgetError(
                f"sweep {point.sweep}: {point.method} is not among --methods ({', '.join(blocks) or '-'}); "
                f"its points change {point.method}'s main block: add it to --methods or drop it from "
                "the sweep (--sweeps_conf)"
            )
        out[point.name], row = sweep_block(model, blocks[point.method], point, budget)
        rows.append(row)
    return out, rows


def write_outputs(out_dir: Path, blocks: dict[str, dict[str, Any]], rows: list[dict]) -> None:
    """``<out_dir>/<run>.yaml`` of every block and ``<out_dir>/budget.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, block in blocks.items():
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(block, sort_keys=False), encoding="utf-8")
    with (out_dir / "budget.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the OWSM model's config.yaml (stage 2)")
    parser.add_argument("--peft_conf_dir", type=Path, required=True, help="the peft blocks, <method>.yaml")
    parser.add_argument("--methods", required=True, help="space-separated methods")
    parser.add_argument("--budget", required=True, help="a number, a method of --peft_conf_dir, or none")
    parser.add_argument("--out_dir", type=Path, required=True, help="output: <method>.yaml, budget.csv")
    parser.add_argument("--utt2domain", type=Path, help="the training set's utt2domain (HDMoLE's domains)")
    parser.add_argument("--sweeps", default="", help='sweeps of --sweeps_conf: "budget split allocation"')
    parser.add_argument("--sweeps_conf", type=Path, default=SWEEPS_CONF, help="the sweeps file")
    args = parser.parse_args(argv)
    try:
        points = sweep_points(args.sweeps_conf, args.sweeps.split())
        rows = write_blocks(
            args.config,
            args.peft_conf_dir,
            args.methods.split(),
            args.budget,
            args.out_dir,
            args.utt2domain,
            points,
        )
    except BudgetError as error:
        print(f"equal_budget.py: error: {error}", file=sys.stderr)
        return 1
    width = max(len(str(row["method"])) for row in rows)
    for row in rows:
        print(f"{row['method']:<{width}} {row['knob']} = {row['value']:<6} trainable {row['trainable']:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
