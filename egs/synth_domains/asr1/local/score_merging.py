"""Stage 13: one model for every domain, merged or trained, against the per-domain models, over seeds;
which differences are real; the lambda curve.

Systems (rows of ``merging.{md,csv}``), each over its seeds (the runs' and merges' ``@seed<i>``):
- ``base``: the pretrained model, zero-shot;
- ``per-domain <kind>``: each domain's own fine-tune of the kind (full, or a PEFT method) on that
  domain's test: the upper bound per domain, but one model per domain (no OOD column; its source WER
  is the mean over the per-domain models and seeds);
- ``joint <kind>``: one model trained on every domain's adapt set together (``all/<kind>``; HDMoLE's
  joint run routes each utterance to its domain's expert);
- ``merged <kind> <algorithm>``: the per-domain models of the kind merged (stage 11), at the knobs
  frozen on the combined in-domain dev sets (``@core``: SSVD-family adapters kept as one subspace
  adapter).

Columns: the seeds; WER and CER (%) on each target domain's test (means over seeds); the in-domain
WER over every target test's utterances together, with its 95 % two-level bootstrap interval over
seeds and utterances (``significance.cell_bootstrap``); ``WER_ft / WER`` = the mean over domains of
the per-domain model's WER of the same kind divided by the system's (1.0: as good as one model per
domain); WER and CER on each out-of-distribution test (domains never adapted to); the source WER with
its interval, and CER; the knobs.

``merging_differences.{md,csv}``: per kind, every one-model system minus the per-domain models
(in-domain and source WER), and every merge minus the joint model (in-domain, source and OOD WER), in
points, with the 95 % paired bootstrap interval over the test utterances, each system's errors
averaged over its seeds (``significance.paired_bootstrap``); an interval that holds zero reads "no
difference".

The curve merges (``@scaling<v>``, seed 0) go to ``merging_lambda.{csv,png}``: in-domain WER against
OOD WER (the mean over the OOD tests) as lambda moves, beside the base and the joint full fine-tune;
the frozen dev grid of every searched algorithm to ``merging_knobs.md``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import yaml
from differences import verdict
from kaldi_files import read_table
from markdown_table import markdown_table
from merge_freeze import describe
from merge_plan import FULL, SCALING, Merge, read_merges
from runs import SEED, Run, read_runs, seed_index, seeded_from
from score import HIGH, LOW, save_figure, seed_errors, write_csv
from scoring import error_rates
from significance import Interval, cell_bootstrap, paired_bootstrap

BASE = "base"
NORMALISED = "WER_ft / WER"
IN_DOMAIN = "in-domain WER"
SOURCE = "source WER"
OOD = "OOD WER"
Decodings = dict[str, list[str]]  # test split -> a system's decodings of it, one per seed
DIFFERENCE_COLUMNS = (
    "kind", "system", "reference", "test", "seeds", "WER difference", "95% low", "95% high", "verdict",
)  # fmt: skip


class MergingScorer:
    """Per-utterance errors and error rates of decoded systems (``decode/<name>``, one per seed) on the
    test splits of the data dir; each decoding's errors are counted once, for its row and every
    paired difference it enters."""

    def __init__(self, data: Path, exp: Path, domains: list[str], ood_domains: list[str]) -> None:
        self.data, self.exp, self.domains, self.ood_domains = data, exp, domains, ood_domains
        self.references = {
            d: read_table(data / f"{d}_test" / "text") for d in [*domains, *ood_domains, "source"]
        }
        self.counted: dict[tuple[tuple[str, ...], str], tuple[np.ndarray, np.ndarray]] = {}

    def errors(self, decoded: list[str], test: str) -> tuple[np.ndarray, np.ndarray]:
        """(seeds x utterances word errors, reference words per utterance) on ``test``."""
        key = (tuple(decoded), test)
        if key not in self.counted:
            self.counted[key] = seed_errors(self.exp, decoded, self.references[test])
        return self.counted[key]

    def pooled(self, decoded: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """The errors on several tests as one test (utterances side by side): ``decoded`` per test."""
        parts = [self.errors(names, test) for test, names in decoded.items()]
        if len({errors.shape[0] for errors, _ in parts}) > 1:
            raise SystemExit(f"{decoded}: a different number of seeds per test; run stage 8 again")
        return np.concatenate([e for e, _ in parts], axis=1), np.concatenate([w for _, w in parts])

    def cer(self, decoded: list[str], test: str) -> float:
        rates = [
            error_rates(
                self.references[test], read_table(self.exp / "decode" / name / "1best_recog" / "text")
            )
            for name in decoded
        ]
        return round(mean(cer.percent for _, cer in rates), 2)

    def row(
        self,
        system: str,
        kind: str,
        targets: dict[str, list[str]],
        source: list[str],
        ood: list[str] | None,
        knobs: str = "",
    ) -> dict[str, Any]:
        """Every column of one system: ``targets`` its decodings per target domain, ``source`` those of
        the source test (stacked as seeds), ``ood`` those of the OOD tests (None: no OOD column)."""
        values: dict[str, Any] = {"system": system, "kind": kind, "seeds": len(targets[self.domains[0]])}
        for domain, names in targets.items():
            errors, words = self.errors(names, domain)
            values[f"{domain} WER"] = round(100.0 * float(errors.sum(axis=1).mean()) / words.sum(), 2)
            values[f"{domain} CER"] = self.cer(names, domain)
        values |= with_interval(IN_DOMAIN, cell_bootstrap(*self.pooled(targets)))
        values[NORMALISED] = ""
        for domain in self.ood_domains:
            values |= {f"{domain} WER": "", f"{domain} CER": ""}
            if ood is not None:
                errors, words = self.errors(ood, domain)
                values[f"{domain} WER"] = round(100.0 * float(errors.sum(axis=1).mean()) / words.sum(), 2)
                values[f"{domain} CER"] = self.cer(ood, domain)
        values |= with_interval(SOURCE, cell_bootstrap(*self.errors(source, "source")))
        values["source CER"] = self.cer(source, "source")
        values["knobs"] = knobs
        return values

    def one_model_row(self, system: str, kind: str, decoded: list[str], knobs: str = "") -> dict[str, Any]:
        """A system with one model for every domain, decoded as ``decoded`` (one per seed)."""
        return self.row(system, kind, {d: decoded for d in self.domains}, decoded, decoded, knobs)


def with_interval(column: str, interval: Interval) -> dict[str, float | str]:
    bounds = {column + LOW: interval.low, column + HIGH: interval.high}
    return {column: round(interval.mean, 2)} | {
        key: "" if np.isnan(value) else round(value, 2) for key, value in bounds.items()
    }


def fill_normalised(rows: list[dict[str, Any]], domains: list[str]) -> None:
    """WER_ft / WER per row whose kind has per-domain models (mean over domains)."""
    reference = {r["kind"]: r for r in rows if str(r["system"]).startswith("per-domain ")}
    for r in rows:
        ft = reference.get(r["kind"])
        if ft is None or r is ft:
            continue
        ratios = [float(ft[f"{d} WER"]) / float(r[f"{d} WER"]) for d in domains if float(r[f"{d} WER"]) > 0]
        r[NORMALISED] = round(mean(ratios), 3) if ratios else ""


def seeded(runs: list[Run], main: Run) -> list[str]:
    """The decodings of a run and its seed repeats, in seed order."""
    repeats = sorted((r for r in runs if r.sweep == SEED and seeded_from(r) == main.name), key=seed_index)
    return [main.name, *(r.name for r in repeats)]


class Systems:
    """The decodings behind every row: per-domain cells, joint runs and merges, each over its seeds."""

    def __init__(self, runs: list[Run], merges: list[Merge], domains: list[str]) -> None:
        self.per_domain: dict[str, dict[str, list[str]]] = defaultdict(dict)  # kind -> domain -> names
        for run in runs:
            if run.sweep == "main" and len(run.tests) == 1 and not run.name.startswith("all/"):
                self.per_domain[run.method][run.tests[0]] = seeded(runs, run)
        self.per_domain = {k: v for k, v in self.per_domain.items() if set(v) >= set(domains)}
        self.joint = {
            run.method: seeded(runs, run)
            for run in runs
            if run.name.startswith("all/") and run.sweep in ("main", "joint")
        }
        grouped: dict[str, list[Merge]] = defaultdict(list)
        for merge in merges:
            if not merge.curve:
                grouped[merge.system].append(merge)
        self.merges = {name: sorted(group, key=lambda m: m.seed) for name, group in grouped.items()}

    def kinds(self) -> list[str]:
        return list(dict.fromkeys([FULL, *(group[0].kind for group in self.merges.values())]))


def merge_label(merge: Merge) -> str:
    return merge.algorithm + ("@core" if merge.form == "ssvd_core" else "")


def system_rows(
    scorer: MergingScorer, systems: Systems, choices: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The table's rows: the base, then per kind its per-domain, joint and merged systems; the joint
    systems of kinds that are not merged (HDMoLE) last."""
    rows = [scorer.one_model_row(BASE, BASE, [BASE])]
    kinds = systems.kinds()
    for kind in kinds:
        if kind in systems.per_domain:
            cell = systems.per_domain[kind]
            source = [name for d in scorer.domains for name in cell[d]]
            rows.append(scorer.row(f"per-domain {kind}", kind, cell, source, None))
            rows[-1][NORMALISED] = 1.0
        if kind in systems.joint:
            rows.append(scorer.one_model_row(f"joint {kind}", kind, systems.joint[kind]))
        for group in (g for g in systems.merges.values() if g[0].kind == kind):
            knobs = describe(choices.get(group[0].choice, {}))
            decoded = [merge.name for merge in group]
            rows.append(scorer.one_model_row(f"merged {kind} {merge_label(group[0])}", kind, decoded, knobs))
    rows += [
        scorer.one_model_row(f"joint {method}", method, names)
        for method, names in systems.joint.items()
        if method not in kinds
    ]
    fill_normalised(rows, scorer.domains)
    return rows


def difference_rows(scorer: MergingScorer, systems: Systems, resamples: int) -> list[dict[str, Any]]:
    """Per kind: each one-model system against the per-domain models, each merge against the joint
    model (module docstring)."""
    rows: list[dict[str, Any]] = []

    def compare(kind: str, system: str, reference: str, test: str, a: list[str], b: Decodings) -> None:
        """``system`` (decoded as ``a``) minus ``reference`` (``b``: its decodings per test split)."""
        errors_a, words = scorer.pooled(dict.fromkeys(b, a))
        errors_b, _ = scorer.pooled(b)
        difference = paired_bootstrap(errors_a, errors_b, words, resamples)
        rows.append(
            {
                "kind": kind,
                "system": system,
                "reference": reference,
                "test": test,
                "seeds": f"{len(errors_a)} / {len(errors_b)}",
                "WER difference": round(difference.mean, 2),
                "95% low": round(difference.low, 2),
                "95% high": round(difference.high, 2),
                "verdict": verdict(difference, system, reference),
            }
        )

    for kind in systems.kinds():
        merged = {
            f"merged {kind} {merge_label(group[0])}": [merge.name for merge in group]
            for group in systems.merges.values()
            if group[0].kind == kind
        }
        joint = systems.joint.get(kind)
        if kind in systems.per_domain:
            cell = systems.per_domain[kind]
            source = {"source": [name for domain in scorer.domains for name in cell[domain]]}
            ones = {f"joint {kind}": joint, **merged} if joint else merged
            for system, decoded in ones.items():
                compare(kind, system, f"per-domain {kind}", "in-domain", decoded, cell)
                compare(kind, system, f"per-domain {kind}", "source", decoded, source)
        if joint:
            tests = {"in-domain": scorer.domains, "source": ["source"], "OOD": scorer.ood_domains}
            for system, decoded in merged.items():
                for test, splits in tests.items():
                    if splits:
                        compare(kind, system, f"joint {kind}", test, decoded, dict.fromkeys(splits, joint))
    return rows


def curve_rows(scorer: MergingScorer, merges: list[Merge]) -> list[dict[str, Any]]:
    rows = []
    for merge in merges:
        if not merge.curve:
            continue
        row = scorer.one_model_row(merge.name, merge.kind, [merge.name])
        ood = [float(row[f"{d} WER"]) for d in scorer.ood_domains]
        rows.append(
            {
                "algorithm": merge.algorithm,
                SCALING: float(merge.name.rsplit(SCALING, 1)[1]),
                IN_DOMAIN: row[IN_DOMAIN],
                OOD: round(mean(ood), 2) if ood else "",
                SOURCE: row[SOURCE],
            }
        )
    return rows


def knobs_markdown(frozen: dict[str, Any], path: Path) -> str:
    rows = [
        {
            "merges": choice,
            "dev grid: knobs -> accuracy": "; ".join(
                f"{knobs} -> {score:.4f}" for knobs, score in grid.items()
            ),
            "chosen": describe(frozen["choices"][choice]),
        }
        for choice, grid in frozen["scores"].items()
    ]
    lines = [
        "# Merge knobs chosen on the in-domain dev sets (token accuracy) and frozen before any test decode",
        "",
        f"Frozen in `{path}` (made {frozen['made']}), from the tuning merges of the seed-0 runs.",
        "",
    ]
    return (
        "\n".join([*lines, *markdown_table(rows, ["merges", "dev grid: knobs -> accuracy", "chosen"])]) + "\n"
    )


def readable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for reading: each column with an interval as ``mean [low, high]``."""
    shown = []
    for r in rows:
        values = {key: value for key, value in r.items() if not key.endswith((LOW, HIGH))}
        for column in (IN_DOMAIN, SOURCE):
            if r[column + LOW] != "":
                values[column] = f"{r[column]} [{r[column + LOW]}, {r[column + HIGH]}]"
        shown.append(values)
    return shown


def plot_curve(curve: list[dict[str, Any]], rows: list[dict[str, Any]], ood: list[str], path: Path) -> None:
    """In-domain WER against OOD WER, one line per algorithm through its lambdas, with the base,
    the joint full fine-tune and the chosen merges as reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ood_wer(r: dict[str, Any]) -> float:
        return mean(float(r[f"{d} WER"]) for d in ood)

    figure, axis = plt.subplots(figsize=(6.0, 4.5))
    for index, algorithm in enumerate(dict.fromkeys(r["algorithm"] for r in curve)):
        line = sorted((r for r in curve if r["algorithm"] == algorithm), key=lambda r: r[SCALING])
        x, y = [r[IN_DOMAIN] for r in line], [r[OOD] for r in line]
        axis.plot(x, y, marker="o", color=f"C{index}", label=f"merged full {algorithm}")
        for r in line:
            axis.annotate(f"λ={r[SCALING]:g}", (r[IN_DOMAIN], r[OOD]), fontsize=7)
    for r in rows:
        if r["system"] in (BASE, f"joint {FULL}"):
            marker = "*" if r["system"] == BASE else "s"
            axis.scatter(r[IN_DOMAIN], ood_wer(r), marker=marker, s=80, color="black", label=r["system"])
    axis.set_xlabel("in-domain WER % (lower: better on the adapted domains)")
    axis.set_ylabel(f"OOD WER % ({', '.join(ood)}; never adapted)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--exp", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True, help="runs.tsv of stage 8")
    parser.add_argument("--merges", type=Path, required=True, help="merges.tsv of stage 11")
    parser.add_argument("--frozen", type=Path, required=True, help="merge knobs frozen on dev (stage 11)")
    parser.add_argument("--domains", required=True, help="space-separated target domains")
    parser.add_argument("--ood_domains", default="", help="space-separated out-of-distribution domains")
    parser.add_argument("--base_model", required=True, help="the base model's file (named in the table)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    args = parser.parse_args()
    domains, ood = args.domains.split(), args.ood_domains.split()
    scorer = MergingScorer(args.data, args.exp, domains, ood)
    merges = read_merges(args.merges)
    systems = Systems(read_runs(args.runs), merges, domains)
    frozen = yaml.safe_load(args.frozen.read_text())
    rows = system_rows(scorer, systems, frozen["choices"])
    write_csv(rows, tuple(rows[0]), args.exp / "merging.csv")
    note = (
        "In-domain and source WER: the mean over the seeds [95 % bootstrap interval over seeds and "
        "utterances]; merge knobs frozen on dev in "
        f"`{args.frozen.parent / frozen['file']}`."
    )
    title = [
        f"# One model for every domain: {args.exp}",
        "",
        f"Base model: `{args.base_model}`",
        "",
        note,
        "",
    ]
    table = "\n".join([*title, *markdown_table(readable(rows))]) + "\n"
    (args.exp / "merging.md").write_text(table)
    differences = difference_rows(scorer, systems, args.resamples)
    write_csv(differences, DIFFERENCE_COLUMNS, args.exp / "merging_differences.csv")
    lines = [
        f"# Paired differences of the one-model systems: {args.exp}",
        "",
        "WER of the system minus WER of the reference, in points, with the 95 % paired bootstrap interval "
        "over the test's utterances, each system's errors averaged over its seeds (seeds: the system's / "
        "the reference's; per-domain on the source: every per-domain model's seeds).",
        "",
        *markdown_table(differences, DIFFERENCE_COLUMNS),
    ]
    (args.exp / "merging_differences.md").write_text("\n".join(lines) + "\n")
    (args.exp / "merging_knobs.md").write_text(knobs_markdown(frozen, args.frozen.parent / frozen["file"]))
    print(table)
    curve = curve_rows(scorer, merges)
    if curve:
        write_csv(curve, tuple(curve[0]), args.exp / "merging_lambda.csv")
        if ood:
            plot_curve(curve, rows, ood, args.exp / "merging_lambda.png")


if __name__ == "__main__":
    main()
