"""Stage 10: WER and CER of every model on each target test and the source test; one results table.

    WER = (S + D + I) / N over all words of a test split (word-level Levenshtein alignment)
    CER = the same over characters, spaces included (ESPnet's char tokens count <space>)
    forgetting = source WER after adaptation - source WER of the base model (zero-shot)
    share of full-FT gain = 100 (WER_base - WER) / (WER_base - WER_full) on the same target test
                            (how much of full fine-tuning's improvement a method gets; empty when
                            full fine-tuning did not improve on the base or did not run)

A cell of the main table (a method on a domain) is the mean over its seeds (the main run and its
``seed`` runs); its target WER has a 95 % two-level bootstrap interval (seeds and test utterances,
``significance.cell_bootstrap``), its forgetting a 95 % paired bootstrap interval against the base on
the source test's utterances (``significance.paired_bootstrap``); the base's target WER has the
bootstrap interval over the utterances. Every run's own row is in ``results_seeds.csv``. HDMoLE has a
second row per domain, ``hdmole@oracle``: its runs decoded with that domain's experts merged (the
true domain given instead of the router's choice; stage 9).

Runs come from ``runs.tsv`` (local/finetune_configs.py). Main table: per target domain, the base model
(zero-shot) and every main run tested on it (HDMoLE, trained once on all domains, on each): written
as ``results.csv``, ``results.md`` and ``learning_vs_forgetting.png`` (target WER against source WER,
one point per method, one panel per domain). Sweeps (budget, SSVD-O split, allocation, few-shot), each
with the main run of the same method as its point at the main setting: ``sweeps.csv``, ``sweeps.md``
and ``sweeps.png`` (target WER against trainable parameters, outer share, the part of the model that
holds the adapters, adaptation utterances).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from kaldi_files import read_table
from markdown_table import markdown_table
from runs import SEED, SWEEPS, Run, read_runs, seed_index, seeded_from
from scoring import ErrorRate, error_rates, utterance_errors
from significance import Interval, cell_bootstrap, paired_bootstrap

BASE = "base"
FULL = "full"
HDMOLE = "hdmole"
ORACLE = "@oracle_"  # an HDMoLE run decoded with one domain's experts merged (the true domain given)
GAIN_SHARE = "share of full-FT gain %"
FORGETTING = "forgetting (source WER change)"
COLUMNS = (
    "domain", "method", "trainable params", "target WER", "target CER", GAIN_SHARE,
    "source WER", "source CER", FORGETTING, "train seconds", "peak memory MB",
)  # fmt: skip
LOW, HIGH = " 95% low", " 95% high"
WITH_INTERVALS = ("target WER", FORGETTING)  # the main table's columns with an interval
CELL_COLUMNS = (
    "domain", "method", "seeds", "trainable params", "target WER", "target WER" + LOW, "target WER" + HIGH,
    "target CER", GAIN_SHARE, "source WER", "source CER", FORGETTING, FORGETTING + LOW, FORGETTING + HIGH,
    "train seconds", "peak memory MB",
)  # fmt: skip
SEED_COLUMNS = ("run", "seed", *COLUMNS)
SWEEP_COLUMNS = ("sweep", "value", *COLUMNS)
SWEEP_AXES = {
    "budget": "trainable parameters",
    "split": "SSVD-O outer share of the rotation budget",
    "allocation": "adapted part of the model (same budget)",
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
        self.base_source_errors, self.source_words = word_errors(self.source_refs, self.base_hyps)
        self.planned = json.loads((exp / "finetune_conf" / "trainable.json").read_text())

    def base_row(self, domain: str) -> dict[str, object]:
        target = error_rates(self.targets(domain), self.base_hyps)
        return row(domain, BASE, 0, target, self.base_source, self.base_source, None)

    def base_cell(self, domain: str) -> dict[str, object]:
        """The base's row of the main table: its target WER with the interval over utterances."""
        errors, words = word_errors(self.targets(domain), self.base_hyps)
        base = self.base_row(domain)
        nothing = Interval(0.0, float("nan"), float("nan"))
        return cell(base, "", cell_bootstrap(errors, words), nothing)

    def main_cell(self, domain: str, runs: list[Run], decoded: str = "") -> dict[str, object]:
        """A method's row of the main table from its runs at every seed (module docstring); ``decoded``:
        the suffix of another decoding of each run (``@oracle_<domain>``), its row the method's name
        with that suffix."""
        per_seed = [self.run_row(run, domain, decoded) for run in runs]
        names = [run.name + decoded for run in runs]
        target_errors, target_words = seed_errors(self.exp, names, self.targets(domain))
        source_errors, _ = seed_errors(self.exp, names, self.source_refs)
        target = cell_bootstrap(target_errors, target_words)
        forgetting = paired_bootstrap(source_errors, self.base_source_errors, self.source_words)
        means = {
            column: round(float(np.mean([float(r[column]) for r in per_seed])), 2)
            for column in ("target CER", "source WER", "source CER", "train seconds", "peak memory MB")
        }
        return cell({**per_seed[0], **means}, str(len(runs)), target, forgetting)

    def targets(self, domain: str) -> dict[str, str]:
        return read_table(self.data / f"{domain}_test" / "text")

    def hypotheses(self, decoded: str) -> dict[str, str]:
        return read_table(self.exp / "decode" / decoded / "1best_recog" / "text")

    def oracle_decoded(self, runs: list[Run], domain: str) -> bool:
        """Whether every run of an HDMoLE cell was decoded with ``domain``'s experts (stage 9)."""
        return all(
            (self.exp / "decode" / f"{run.name}{ORACLE}{domain}" / "1best_recog").is_dir() for run in runs
        )

    def run_row(self, run: Run, domain: str, decoded: str = "") -> dict[str, object]:
        hyps = self.hypotheses(run.name + decoded)
        run_dir = self.exp / run.name
        return row(
            domain,
            run.method + decoded.replace(f"_{domain}", ""),
            trainable_parameters(run_dir, run.method, self.planned[Path(run.config).stem]),
            error_rates(self.targets(domain), hyps),
            error_rates(self.source_refs, hyps),
            self.base_source,
            json.loads((run_dir / "train_stats.json").read_text()),
        )


def word_errors(references: dict[str, str], hypotheses: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(word errors, reference words) per utterance, in the references' order."""
    errors = utterance_errors(references, hypotheses)
    return np.array([w.errors for w, _ in errors]), np.array([w.length for w, _ in errors])


def seed_errors(exp: Path, decoded: list[str], references: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(seeds x utterances word errors, reference words per utterance) of the decodings ``decoded``
    (names under ``<exp>/decode``: a cell's runs, one per seed)."""
    hypotheses = [read_table(exp / "decode" / name / "1best_recog" / "text") for name in decoded]
    errors = [word_errors(references, hyps) for hyps in hypotheses]
    return np.stack([e for e, _ in errors]), errors[0][1]


def cell(run_row: dict[str, object], seeds: str, target: Interval, forgetting: Interval) -> dict[str, object]:
    """A main-table row: ``run_row``'s values with the seeds, the target WER and the forgetting (means
    over the seeds) and their intervals (empty when there is none)."""
    values = {
        **run_row,
        "seeds": seeds,
        "target WER": round(target.mean, 2),
        FORGETTING: round(forgetting.mean, 2),
    }
    for column, interval in (("target WER", target), (FORGETTING, forgetting)):
        for suffix, bound in ((LOW, interval.low), (HIGH, interval.high)):
            values[column + suffix] = "" if np.isnan(bound) else round(bound, 2)
    return {column: values[column] for column in CELL_COLUMNS}


def cells(runs: list[Run], domain: str) -> dict[str, list[Run]]:
    """Each method's runs tested on ``domain``: its main run, then its seed runs in seed order."""
    grouped = {run.name: [run] for run in runs if run.sweep == "main" and domain in run.tests}
    for run in sorted((r for r in runs if r.sweep == SEED), key=seed_index):
        if seeded_from(run) in grouped:
            grouped[seeded_from(run)].append(run)
    return {cell[0].method: cell for cell in grouped.values()}


def result_rows(scorer: Scorer, runs: list[Run], domains: list[str]) -> list[dict[str, object]]:
    """Per domain: the base (zero-shot), then every method tested on that domain, over its seeds."""
    rows: list[dict[str, object]] = []
    for domain in domains:
        rows.append(scorer.base_cell(domain))
        for method, cell_runs in cells(runs, domain).items():
            rows.append(scorer.main_cell(domain, cell_runs))
            if method == HDMOLE and scorer.oracle_decoded(cell_runs, domain):
                rows.append(scorer.main_cell(domain, cell_runs, f"{ORACLE}{domain}"))
    return rows


def seed_rows(scorer: Scorer, runs: list[Run], domains: list[str]) -> list[dict[str, object]]:
    """Every run of the main table on its own (``results_seeds.csv``): run name (its decoding's, for an
    oracle-routing row) and seed first."""
    rows: list[dict[str, object]] = []
    for domain in domains:
        for method, cell_runs in cells(runs, domain).items():
            decodings = [""]
            if method == HDMOLE and scorer.oracle_decoded(cell_runs, domain):
                decodings.append(f"{ORACLE}{domain}")
            for decoded in decodings:
                for run in cell_runs:
                    seed = run.value if run.sweep == SEED else "0"
                    rows.append(
                        {"run": run.name + decoded, "seed": seed, **scorer.run_row(run, domain, decoded)}
                    )
    return rows


def sweep_rows(scorer: Scorer, runs: list[Run], main_settings: dict[str, str]) -> list[dict[str, object]]:
    """Every sweep run, and the main run of the same (domain, method) as the sweep's point at the main
    setting (``main_settings``: the budget's rank or k, SSVD-O's outer share, ``all`` layers; few-shot:
    the adapt size)."""
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
    dated = frozen.parent / record["file"]
    return (
        f"Learning rates: frozen on dev in `{dated if dated.is_file() else frozen}` (made {record['made']})"
    )


def with_intervals(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Main-table rows for reading: each column of WITH_INTERVALS as ``mean [low, high]``."""
    readable = []
    for r in rows:
        shown = {column: value for column, value in r.items() if not column.endswith((LOW, HIGH))}
        for column in WITH_INTERVALS:
            if r[column + LOW] != "":
                shown[column] = f"{r[column]} [{r[column + LOW]}, {r[column + HIGH]}]"
        readable.append(shown)
    return readable


def markdown(rows: list[dict[str, object]], title: str, base_model: str, rates: str) -> str:
    lines = [f"# {title}", "", f"Base model (the zero-shot rows, the start of every run): `{base_model}`", ""]
    lines += [rates, "", *markdown_table(rows)]
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
            x, y = float(r["source WER"]), float(r["target WER"])
            errors = {}
            if r["target WER" + LOW] != "":
                errors["yerr"] = [[y - float(r["target WER" + LOW])], [float(r["target WER" + HIGH]) - y]]
            if r[FORGETTING + LOW] != "":
                forgetting = float(r[FORGETTING])
                low, high = float(r[FORGETTING + LOW]), float(r[FORGETTING + HIGH])
                errors["xerr"] = [[forgetting - low], [high - forgetting]]
            axis.errorbar(x, y, fmt=marker, color=colors[r["method"]], elinewidth=0.8, capsize=2, **errors)
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
        categories = list(dict.fromkeys(str(r["value"]) for r in rows_of_sweep))  # allocation: parts
        for domain, method in dict.fromkeys((r["domain"], r["method"]) for r in rows_of_sweep):
            line = [r for r in rows_of_sweep if (r["domain"], r["method"]) == (domain, method)]
            if sweep == "allocation":
                x = [float(categories.index(str(r["value"]))) for r in line]
            else:
                x = [float(r["trainable params"] if sweep == "budget" else r["value"]) for r in line]
            order = sorted(range(len(x)), key=x.__getitem__)
            axis.plot([x[i] for i in order], [line[i]["target WER"] for i in order], marker="o",
                      linestyle=":" if sweep == "allocation" else "-", color=colors[method],
                      label=f"{method} ({domain})")  # fmt: skip
        axis.set_xlabel(SWEEP_AXES[sweep])
        if sweep == "allocation":
            axis.set_xticks(range(len(categories)), categories)
        elif sweep != "split":
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
    write_csv(rows, CELL_COLUMNS, args.exp / "results.csv")
    per_seed = seed_rows(scorer, runs, domains)
    fill_gain_shares(per_seed, rows)
    write_csv(per_seed, SEED_COLUMNS, args.exp / "results_seeds.csv")
    seeds = sorted({int(r["seeds"]) for r in rows if r["seeds"] != ""})
    note = (
        f"{rates}\n\nSeeds per cell: {', '.join(map(str, seeds))} (each run: results_seeds.csv). "
        "Target WER: the mean over the seeds [95 % bootstrap interval over seeds and test utterances]; "
        "forgetting: [95 % paired bootstrap interval against the base over the source test's utterances]."
    )
    table = markdown(with_intervals(rows), f"Learning vs forgetting: {args.exp}", args.base_model, note)
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
