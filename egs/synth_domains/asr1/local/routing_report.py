"""Stage 10: HDMoLE's routing on every test split, over its seeds (from stage 9's
``decode/<run>/routing/routing.csv`` of the main HDMoLE run and its seed runs).

Per test split: the routing accuracy (the share of utterances the domain router sends to the split's
own domain) as the mean over the seeds with its 95 % Student-t interval (``significance.seed_interval``,
cut to 0-100; none from one seed), and the confusion row (the share routed to each trained domain,
mean over the seeds). Writes ``hdmole_routing.csv`` and ``hdmole_routing.md`` in the experiment
dir; nothing when the runs have no HDMoLE run.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from markdown_table import markdown_table
from runs import Run, read_runs
from score import HDMOLE, cells
from significance import Interval, seed_interval

ACCURACY = "routing accuracy %"


def read_routing(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise SystemExit(f"no {path}: run stage 9 (it routes every test utterance of the HDMoLE runs)")
    with path.open() as f:
        return list(csv.DictReader(f))


def routing_rows(exp: Path, runs: list[Run]) -> list[dict[str, object]]:
    """One row per test split: seeds, accuracy (mean, interval) and the mean confusion row."""
    main = [run for run in runs if run.method == HDMOLE and run.sweep == "main"]
    if not main:
        return []
    hdmole = cells(runs, main[0].tests[0])[HDMOLE]  # the main run, then its seed runs
    tables = [read_routing(exp / "decode" / run.name / "routing" / "routing.csv") for run in hdmole]
    domains = [column for column in tables[0][0] if column not in ("split", "utterances", ACCURACY)]
    rows: list[dict[str, object]] = []
    for index, first in enumerate(tables[0]):
        per_seed = [table[index] for table in tables]
        row: dict[str, object] = {
            "split": first["split"],
            "utterances": first["utterances"],
            "seeds": len(tables),
        }
        row[ACCURACY] = ""
        if first[ACCURACY] != "":
            accuracy = seed_interval([float(r[ACCURACY]) for r in per_seed])
            row[ACCURACY] = Interval(
                accuracy.mean, max(accuracy.low, 0.0), min(accuracy.high, 100.0)
            ).describe()
        for domain in domains:
            row[f"to {domain} %"] = round(sum(float(r[domain]) for r in per_seed) / len(per_seed), 1)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp", type=Path, required=True, help="experiment dir of the run")
    parser.add_argument("--runs", type=Path, required=True, help="runs.tsv of local/finetune_configs.py")
    args = parser.parse_args()
    rows = routing_rows(args.exp, read_runs(args.runs))
    if not rows:
        return
    columns = list(rows[0])
    with (args.exp / "hdmole_routing.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# HDMoLE routing: {args.exp}",
        "",
        "Routing accuracy: the share of a test split's utterances the domain router sends to the split's "
        "own domain, mean over the seeds [95 % Student-t interval]; `to <domain>`: the share sent to each "
        "trained domain (a confusion row, mean over the seeds).",
        "",
        *markdown_table(rows),
    ]
    (args.exp / "hdmole_routing.md").write_text("\n".join(lines) + "\n")
    print((args.exp / "hdmole_routing.md").read_text())


if __name__ == "__main__":
    main()
