"""Stage 10: WER and CER of every model on each target test and the source test; one results table.

    WER = (S + D + I) / N over all words of a test split (word-level Levenshtein alignment)
    CER = the same over characters, spaces included (ESPnet's char tokens count <space>)
    forgetting = source WER after adaptation - source WER of the base model (zero-shot)
    share of full-FT gain = 100 (WER_base - WER) / (WER_base - WER_full) on the same target test
                            (how much of full fine-tuning's improvement a method gets; empty when
                            full fine-tuning did not improve on the base or did not run)

Runs come from ``runs.tsv`` (local/finetune_configs.py). Main table: per target domain, the base model
(zero-shot) and every main run tested on it (HDMoLE, trained once on all domains, on each): written
as ``results.csv``, ``results.md`` and ``learning_vs_forgetting.png`` (target WER against source WER,
one point per method, one panel per domain). Sweeps (budget, SSVD-O split, few-shot), each with the
main run of the same method as its point at the main setting: ``sweeps.csv``, ``sweeps.md`` and
``sweeps.png`` (target WER against trainable parameters, outer share, adaptation utterances).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import yaml
from kaldi_files import read_table
from runs import SWEEPS, Run, read_runs
from scoring import ErrorRate, error_rates

BASE = "base"
FULL = "full"
GAIN_SHARE = "share of full-FT gain %"
COLUMNS = (
    "domain", "method", "trainable params", "target WER", "target CER", GAIN_SHARE,
    "source WER", "source CER", "forgetting (source WER change)", "train seconds", "peak memory MB",
)  # fmt: skip
SWEEP_COLUMNS = ("sweep", "value", *COLUMNS)
SWEEP_AXES = {
    "budget": "trainable parameters",
    "split": "SSVD-O outer share of the rotation budget",
    "fewshot": "adaptation utterances",
}


def trainable_parameters(run_dir: Path, method: str, planned: int) -> int:
    """What the run trained, from the plugin's fusion_budget.json (a feature-fusion row) or
    peft_budget.json; for full fine-tuning (or a run without either), the planned count."""
    for name in ("fusion_budget.json", "peft_budget.json"):
        budget_file = run_dir / name
        if method != "full" and budget_file.exists():
            return int(json.loads(budget_file.read_text())["trainable"])
    return planned


class Scorer:
    """Error rates of the base and of every run against the test references of the data dir."""

    def __init__(self, data: Path, exp: Path) -> None:
        self.data, self.exp = data, exp
        self.source_refs = read_table(data / "source_test" / "text")
        self.base_hyps = read_table(exp / "decode" / BASE / "1best_recog" / "text")
        self.base_source = error_rates(self.source_refs, self.base_hyps)
        self.planned = json.loads((exp / "finetune_conf" / "trainable.json").read_text())

    def base_row(self, domain: str) -> dict[str, object]:
        target = error_rates(self.targets(domain), self.base_hyps)
        return row(domain, BASE, 0, target, self.base_source, self.base_source, None)

    def targets(self, domain: str) -> dict[str, str]:
        return read_table(self.data / f"{domain}_test" / "text")

    def run_row(self, run: Run, domain: str) -> dict[str, object]:
        hyps = read_table(self.exp / "decode" / run.name / "1best_recog" / "text")
        run_dir = self.exp / run.name
        return row(
            domain,
            run.method,
            trainable_parameters(run_dir, run.method, self.planned[Path(run.config).stem]),
            error_rates(self.targets(domain), hyps),
            error_rates(self.source_refs, hyps),
            self.base_source,
            json.loads((run_dir / "train_stats.json").read_text()),
        )


def result_rows(scorer: Scorer, runs: list[Run], domains: list[str]) -> list[dict[str, object]]:
    """Per domain: the base (zero-shot), then every main run tested on that domain."""
    rows: list[dict[str, object]] = []
    for domain in domains:
        rows.append(scorer.base_row(domain))
        rows += [scorer.run_row(r, domain) for r in runs if r.sweep == "main" and domain in r.tests]
    return rows


def sweep_rows(scorer: Scorer, runs: list[Run], main_settings: dict[str, str]) -> list[dict[str, object]]:
    """Every sweep run, and the main run of the same (domain, method) as the sweep's point at the main
    setting (``main_settings``: the budget's rank or k, SSVD-O's outer share; few-shot: the adapt size)."""
    rows: list[dict[str, object]] = []
    for sweep in SWEEPS:
        swept = [r for r in runs if r.sweep == sweep]
        points = {(r.tests[0], r.method) for r in swept}
        main = [
            r for r in runs if r.sweep == "main" and len(r.tests) == 1 and (r.tests[0], r.method) in points
        ]
        for run in [*main, *swept]:
            value = run.value if run.sweep == sweep else main_settings.get(sweep, "")
            if sweep == "fewshot" and run.sweep == "main":
                value = str(len(read_table(Path(run.train) / "text")))
            rows.append({"sweep": sweep, "value": value, **scorer.run_row(run, run.tests[0])})
    return rows


def fill_gain_shares(rows: list[dict[str, object]], main_rows: list[dict[str, object]]) -> None:
    """Set each row's share of full fine-tuning's gain over the base on its domain, from the base and
    ``full`` rows of ``main_rows``: 100 (WER_base - WER) / (WER_base - WER_full); empty for the base
    and where full fine-tuning did not run or did not improve on the base."""
    target_wer = {(r["domain"], r["method"]): float(r["target WER"]) for r in main_rows}
    for r in rows:
        base = target_wer.get((r["domain"], BASE))
        full = target_wer.get((r["domain"], FULL))
        r[GAIN_SHARE] = ""
        if r["method"] != BASE and base is not None and full is not None and base > full:
            r[GAIN_SHARE] = round(100.0 * (base - float(r["target WER"])) / (base - full), 1)


def row(
    domain: str,
    method: str,
    trainable: int,
    target: tuple[ErrorRate, ErrorRate],
    source: tuple[ErrorRate, ErrorRate],
    base_source: tuple[ErrorRate, ErrorRate],
    stats: dict[str, float] | None,
) -> dict[str, object]:
    """One table row from (WER, CER) pairs; train seconds and peak memory are empty for the base, the
    share of full fine-tuning's gain is filled in later (fill_gain_shares)."""
    values = (
        domain, method, trainable, round(target[0].percent, 2), round(target[1].percent, 2), "",
        round(source[0].percent, 2), round(source[1].percent, 2),
        round(source[0].percent - base_source[0].percent, 2),
        "" if stats is None else stats["seconds"], "" if stats is None else stats["peak_memory_mb"],
    )  # fmt: skip
    return dict(zip(COLUMNS, values, strict=True))


def write_csv(rows: list[dict[str, object]], columns: tuple[str, ...], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def rates_note(frozen: Path | None) -> str:
    """Where the learning rates came from: the frozen file (with its date) or the adapters file."""
    if frozen is None or not frozen.is_file():
        return "Learning rates: the adapters file's `training` (not frozen on dev: `--tune true`)"
    record = yaml.safe_load(frozen.read_text())
    return f"Learning rates: frozen on dev in `{frozen.parent / record['file']}` (made {record['made']})"


def markdown(rows: list[dict[str, object]], title: str, base_model: str, rates: str) -> str:
    columns = list(rows[0])
    lines = [f"# {title}", "", f"Base model (the zero-shot rows, the start of every run): `{base_model}`", ""]
    lines += [rates, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [f"{value:,}" if isinstance(value, int) else str(value) or "-" for value in r.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {method: f"C{i}" for i, method in enumerate(dict.fromkeys(r["method"] for r in rows))}
    figure, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 4.0), squeeze=False)
    for axis, domain in zip(axes[0], domains, strict=True):
        for r in (r for r in rows if r["domain"] == domain):
            marker = "*" if r["method"] == BASE else "o"
            axis.scatter(r["source WER"], r["target WER"], marker=marker, color=colors[r["method"]])
            axis.annotate(str(r["method"]), (r["source WER"], r["target WER"]), fontsize=8)
        axis.set_title(domain)
        axis.set_xlabel("source WER % (forgetting: right)")
        axis.set_ylabel("target WER % (learning: down)")
        axis.grid(alpha=0.3)
    save_figure(figure, path)


def save_figure(figure: Any, path: Path) -> None:
    """Lay out, write as a PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_sweeps(rows: list[dict[str, object]], path: Path) -> None:
    """Target WER against the swept value, one line per (domain, method), one panel per sweep; a method
    has the same colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = list(dict.fromkeys(str(r["sweep"]) for r in rows))
    colors = {method: f"C{i}" for i, method in enumerate(dict.fromkeys(r["method"] for r in rows))}
    figure, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 4.0), squeeze=False)
    for axis, sweep in zip(axes[0], sweeps, strict=True):
        rows_of_sweep = [r for r in rows if r["sweep"] == sweep]
        for domain, method in dict.fromkeys((r["domain"], r["method"]) for r in rows_of_sweep):
            line = [r for r in rows_of_sweep if (r["domain"], r["method"]) == (domain, method)]
            x = [float(r["trainable params"] if sweep == "budget" else r["value"]) for r in line]
            order = sorted(range(len(x)), key=x.__getitem__)
            axis.plot([x[i] for i in order], [line[i]["target WER"] for i in order], marker="o",
                      color=colors[method], label=f"{method} ({domain})")  # fmt: skip
        axis.set_xlabel(SWEEP_AXES[sweep])
        if sweep != "split":
            axis.set_xscale("log")
        axis.set_ylabel("target WER %")
        axis.set_title(sweep)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="data dir: source_test, <domain>_test")
    parser.add_argument("--exp", type=Path, required=True, help="experiment dir of the run")
    parser.add_argument("--runs", type=Path, required=True, help="runs.tsv of local/finetune_configs.py")
    parser.add_argument("--domains", required=True, help="target domains, space-separated")
    parser.add_argument("--base_model", required=True, help="the base model's file (named in the tables)")
    parser.add_argument("--frozen", type=Path, default=None, help="frozen learning rates (may not exist)")
    args = parser.parse_args()
    rates = rates_note(args.frozen)
    domains = args.domains.split()
    scorer = Scorer(args.data, args.exp)
    runs = read_runs(args.runs)
    rows = result_rows(scorer, runs, domains)
    fill_gain_shares(rows, rows)
    write_csv(rows, COLUMNS, args.exp / "results.csv")
    table = markdown(rows, f"Learning vs forgetting: {args.exp}", args.base_model, rates)
    (args.exp / "results.md").write_text(table)
    plot(rows, domains, args.exp / "learning_vs_forgetting.png")
    print(table)
    main_settings = json.loads((args.runs.parent / "main_settings.json").read_text())
    swept = sweep_rows(scorer, runs, main_settings)
    fill_gain_shares(swept, rows)
    if swept:
        write_csv(swept, SWEEP_COLUMNS, args.exp / "sweeps.csv")
        (args.exp / "sweeps.md").write_text(markdown(swept, f"Sweeps: {args.exp}", args.base_model, rates))
        plot_sweeps(swept, args.exp / "sweeps.png")
        print((args.exp / "sweeps.md").read_text())


if __name__ == "__main__":
    main()
