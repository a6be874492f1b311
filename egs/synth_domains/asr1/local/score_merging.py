"""Stage 13: one model for every domain, merged or trained, against the per-domain models; the lambda curve.

Systems (rows of ``merging.{md,csv}``):
- ``base``: the pretrained model, zero-shot;
- ``per-domain <kind>``: each domain's own fine-tune of the kind (full, or a PEFT method) on that
  domain's test: the upper bound per domain, but one model per domain (no OOD column; its source WER
  is the mean over the per-domain models);
- ``joint <kind>``: one model trained on every domain's adapt set together (``all/<kind>``; HDMoLE's
  joint run routes each utterance to its domain's expert);
- ``merged <kind> <algorithm>``: the per-domain models of the kind merged (stage 11), with the knobs
  chosen on the combined in-domain dev sets (``@core``: SSVD-family adapters kept as one subspace adapter).

Columns: WER and CER (%) on each target domain's test, their in-domain mean (over domains),
``WER_ft / WER`` = the mean over domains of the per-domain model's WER of the same kind divided by the
system's (1.0: as good as one model per domain; empty without per-domain models of the kind), WER and
CER on each out-of-distribution test (domains never adapted to), on the source test, and the knobs.
The curve merges (``@scaling<v>``) go to ``merging_lambda.{csv,png}``: in-domain mean WER against OOD
WER (mean over OOD domains) as lambda moves, beside the base and the joint full fine-tune; the dev
grid of every searched merge to ``merging_knobs.md``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from statistics import mean
from typing import Any

import yaml
from kaldi_files import read_table
from markdown_table import markdown_table
from merge_plan import FULL, SCALING, Merge, read_merges
from runs import Run, read_runs
from score import save_figure, write_csv
from scoring import ErrorRate, error_rates

BASE = "base"
CURVE = re.compile(rf"@{SCALING}([0-9.eE+-]+)$")
NORMALISED = "WER_ft / WER"


class MergingScorer:
    """Error rates of decoded systems on the test splits of the data dir."""

    def __init__(self, data: Path, exp: Path, domains: list[str], ood_domains: list[str]) -> None:
        self.data, self.exp, self.domains, self.ood_domains = data, exp, domains, ood_domains
        self.references = {
            d: read_table(data / f"{d}_test" / "text") for d in [*domains, *ood_domains, "source"]
        }

    def rates(self, system: str, domain: str) -> tuple[ErrorRate, ErrorRate]:
        hypotheses = read_table(self.exp / "decode" / system / "1best_recog" / "text")
        return error_rates(self.references[domain], hypotheses)

    def row(self, system: str, kind: str, decoded: str, knobs: str = "") -> dict[str, Any]:
        """Every column of one system decoded in ``decode/<decoded>`` (the normalised column later)."""
        values: dict[str, Any] = {"system": system, "kind": kind}
        for domain in self.domains:
            values |= self.pair(domain, self.rates(decoded, domain))
        values |= self.means(values)
        values[NORMALISED] = ""
        for domain in [*self.ood_domains, "source"]:
            values |= self.pair(domain, self.rates(decoded, domain))
        values["knobs"] = knobs
        return values

    def per_domain_row(self, kind: str, runs: dict[str, Run]) -> dict[str, Any]:
        """Each domain's own model on its test; OOD empty; source: the mean over the models."""
        values: dict[str, Any] = {"system": f"per-domain {kind}", "kind": kind}
        for domain in self.domains:
            values |= self.pair(domain, self.rates(runs[domain].name, domain))
        values |= self.means(values)
        values[NORMALISED] = 1.0
        for domain in self.ood_domains:
            values |= {f"{domain} WER": "", f"{domain} CER": ""}
        source = [self.rates(run.name, "source") for run in runs.values()]
        values["source WER"] = round(mean(wer.percent for wer, _ in source), 2)
        values["source CER"] = round(mean(cer.percent for _, cer in source), 2)
        values["knobs"] = ""
        return values

    @staticmethod
    def pair(domain: str, rates: tuple[ErrorRate, ErrorRate]) -> dict[str, float]:
        return {f"{domain} WER": round(rates[0].percent, 2), f"{domain} CER": round(rates[1].percent, 2)}

    def means(self, values: dict[str, Any]) -> dict[str, float]:
        return {
            f"in-domain {rate}": round(mean(float(values[f"{d} {rate}"]) for d in self.domains), 2)
            for rate in ("WER", "CER")
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


def chosen_knobs(merge_dir: Path) -> tuple[str, dict[str, Any]]:
    """("knob=value ...", merge.yaml) of a merge: the knobs it was made with (the searched ones chosen)."""
    record = yaml.safe_load((merge_dir / "merge.yaml").read_text())
    searched = (record.get("search") or {}).get("grid") or []
    keys = list(searched[0]["knobs"]) if searched else []
    shown = {key: record["knobs"][key] for key in keys}
    return " ".join(
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in shown.items()
    ), record


def system_rows(
    scorer: MergingScorer, runs: list[Run], merges: list[Merge]
) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
    """The table's rows and, per searched merge, its merge.yaml."""
    rows = [scorer.row(BASE, BASE, BASE)]
    kinds = list(dict.fromkeys([FULL, *(m.kind for m in merges if not CURVE.search(m.name))]))
    per_domain = {
        kind: {r.tests[0]: r for r in runs if r.sweep == "main" and r.method == kind and len(r.tests) == 1}
        for kind in kinds
    }
    joint = [r for r in runs if r.name.startswith("all/") and r.sweep in ("main", "joint")]  # seed 0
    records = []
    for kind in kinds:
        if set(per_domain[kind]) >= set(scorer.domains):
            rows.append(scorer.per_domain_row(kind, per_domain[kind]))
        rows += [scorer.row(f"joint {kind}", kind, r.name) for r in joint if r.method == kind]
        for merge in (m for m in merges if m.kind == kind and not CURVE.search(m.name)):
            knobs, record = chosen_knobs(scorer.exp / merge.name)
            label = merge.algorithm + ("@core" if merge.form == "ssvd_core" else "")
            rows.append(scorer.row(f"merged {kind} {label}", kind, merge.name, knobs))
            if record.get("search"):
                records.append((merge.name, record))
    rows += [scorer.row(f"joint {r.method}", r.method, r.name) for r in joint if r.method not in kinds]
    fill_normalised(rows, scorer.domains)
    return rows, records


def curve_rows(scorer: MergingScorer, merges: list[Merge]) -> list[dict[str, Any]]:
    rows = []
    for merge in merges:
        match = CURVE.search(merge.name)
        if match is None:
            continue
        row = scorer.row(merge.name, merge.kind, merge.name)
        ood = [float(row[f"{d} WER"]) for d in scorer.ood_domains]
        rows.append(
            {
                "algorithm": merge.algorithm,
                SCALING: float(match.group(1)),
                "in-domain WER": row["in-domain WER"],
                "OOD WER": round(mean(ood), 2) if ood else "",
                "source WER": row["source WER"],
            }
        )
    return rows


def knobs_markdown(records: list[tuple[str, dict[str, Any]]]) -> str:
    rows = []
    for name, record in records:
        grid = record["search"]["grid"]
        points = "; ".join(
            " ".join(f"{k}={v}" for k, v in point["knobs"].items()) + f" -> {point['score']:.4f}"
            for point in grid
        )
        chosen = " ".join(f"{k}={v}" for k, v in record["search"]["chosen"]["knobs"].items())
        rows.append({"merge": name, "dev grid: knobs -> accuracy": points, "chosen": chosen})
    columns = ["merge", "dev grid: knobs -> accuracy", "chosen"]
    lines = ["# Knobs chosen on the in-domain dev sets (token accuracy), before any test decode", ""]
    return "\n".join([*lines, *markdown_table(rows, columns)]) + "\n"


def plot_curve(curve: list[dict[str, Any]], rows: list[dict[str, Any]], ood: list[str], path: Path) -> None:
    """In-domain mean WER against OOD WER, one line per algorithm through its lambdas, with the base,
    the joint full fine-tune and the chosen merges as reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ood_wer(r: dict[str, Any]) -> float:
        return mean(float(r[f"{d} WER"]) for d in ood)

    figure, axis = plt.subplots(figsize=(6.0, 4.5))
    for index, algorithm in enumerate(dict.fromkeys(r["algorithm"] for r in curve)):
        line = sorted((r for r in curve if r["algorithm"] == algorithm), key=lambda r: r[SCALING])
        x, y = [r["in-domain WER"] for r in line], [r["OOD WER"] for r in line]
        axis.plot(x, y, marker="o", color=f"C{index}", label=f"merged full {algorithm}")
        for r in line:
            axis.annotate(f"λ={r[SCALING]:g}", (r["in-domain WER"], r["OOD WER"]), fontsize=7)
    for r in rows:
        if r["system"] in (BASE, f"joint {FULL}"):
            marker = "*" if r["system"] == BASE else "s"
            axis.scatter(
                r["in-domain WER"], ood_wer(r), marker=marker, s=80, color="black", label=r["system"]
            )
    axis.set_xlabel("in-domain mean WER % (lower: better on the adapted domains)")
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
    parser.add_argument("--domains", required=True, help="space-separated target domains")
    parser.add_argument("--ood_domains", default="", help="space-separated out-of-distribution domains")
    parser.add_argument("--base_model", required=True, help="the base model's file (named in the table)")
    args = parser.parse_args()
    domains, ood = args.domains.split(), args.ood_domains.split()
    scorer = MergingScorer(args.data, args.exp, domains, ood)
    merges = read_merges(args.merges)
    rows, records = system_rows(scorer, read_runs(args.runs), merges)
    write_csv(rows, tuple(rows[0]), args.exp / "merging.csv")
    title = [f"# One model for every domain: {args.exp}", "", f"Base model: `{args.base_model}`", ""]
    table = "\n".join([*title, *markdown_table(rows)]) + "\n"
    (args.exp / "merging.md").write_text(table)
    (args.exp / "merging_knobs.md").write_text(knobs_markdown(records))
    print(table)
    curve = curve_rows(scorer, merges)
    if curve:
        write_csv(curve, tuple(curve[0]), args.exp / "merging_lambda.csv")
        if ood:
            plot_curve(curve, rows, ood, args.exp / "merging_lambda.png")


if __name__ == "__main__":
    main()
