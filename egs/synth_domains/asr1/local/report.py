"""Stage 10: one report of a run of the recipe, ``<exp>/report.md``, from the files stages 8-10 wrote:

- the command that made it and the learning rates' origin: the frozen file, its date and every dev
  score of the tuning grid (the chosen rate of each method in bold);
- the learning-vs-forgetting table over seeds, with its intervals (``results.md``);
- the paired differences whose 95 % interval excludes zero (``differences.csv``), and how many do not;
- HDMoLE's routing (``hdmole_routing.md``) and the sweeps (``sweeps.md``), when the run made them.

Every number in it is a cell of a CSV in the same directory (results.csv, results_seeds.csv,
differences.csv, hdmole_routing.csv, sweeps.csv). The documentation copies it as it is:

    local/report.py --exp exp/quick --frozen conf/asr/quick/frozen.yaml --command "./run.sh ..."
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import yaml
from markdown_table import markdown_table


def body(markdown: Path) -> list[str]:
    """A markdown file's lines after its ``# title`` line (and the blank line after it)."""
    lines = markdown.read_text().splitlines()
    return lines[2:] if lines and lines[0].startswith("# ") else lines


def tuning_grid(frozen: Path) -> list[str]:
    """The frozen file's dev scores, methods by rates, each method's choice in bold."""
    record = yaml.safe_load(frozen.read_text())
    scores, choices = record["scores"], record["choices"]
    dated = frozen.parent / record["file"]
    frozen = dated if dated.is_file() else frozen  # current.yaml: name the dated file it copies
    rates = sorted({float(rate) for by_rate in scores.values() for rate in by_rate})
    rows = []
    for method, by_rate in scores.items():
        row = {"method": method}
        for rate in rates:
            score = by_rate.get(rate, by_rate.get(str(rate)))
            shown = "-" if score is None else f"{float(score):.4f}"
            row[f"{rate:g}"] = f"**{shown}**" if rate == float(choices[method]) else shown
        rows.append(row | {"frozen": f"{float(choices[method]):g}"})
    return [
        f"Learning rates frozen on dev in `{frozen}` (made {record['made']}; criterion: "
        f"{record['criterion']}, the mean over the tuning domains). Dev scores per rate, the choice in bold:",
        "",
        *markdown_table(rows),
    ]


def significant_differences(differences: Path) -> list[str]:
    """The differences whose interval excludes zero, one line each, and the count of the others."""
    with differences.open() as f:
        rows = list(csv.DictReader(f))
    real = [row for row in rows if row["verdict"] != "no difference"]
    lines = [
        f"{len(real)} of {len(rows)} paired differences (method minus reference, WER points, 95 % paired "
        f"bootstrap interval, `differences.csv`) exclude zero; the other {len(rows) - len(real)} are no "
        "difference.",
        "",
    ]
    lines += [
        f"- {row['domain']} {row['test']}: {row['method']} - {row['reference']} = {row['WER difference']} "
        f"[{row['95% low']}, {row['95% high']}] ({row['verdict']})"
        for row in real
    ]
    return lines


def report(exp: Path, frozen: Path | None, command: str) -> str:
    lines = [f"# Learning vs forgetting: `{exp}`", "", "Made with:", "", "```bash", command, "```", ""]
    if frozen is not None and frozen.is_file():
        lines += [*tuning_grid(frozen), ""]
    else:
        lines += ["Learning rates: the adapters file's (not frozen on dev).", ""]
    lines += ["## Learning vs forgetting", "", *body(exp / "results.md"), ""]
    lines += ["## Paired differences", "", *significant_differences(exp / "differences.csv"), ""]
    for name, title in (("hdmole_routing.md", "HDMoLE routing"), ("sweeps.md", "Sweeps")):
        if (exp / name).is_file():
            lines += [f"## {title}", "", *body(exp / name), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp", type=Path, required=True, help="experiment dir of the run")
    parser.add_argument("--frozen", type=Path, default=None, help="the frozen learning rates it used")
    parser.add_argument("--command", required=True, help="the command line that made the run")
    args = parser.parse_args()
    (args.exp / "report.md").write_text(report(args.exp, args.frozen, args.command))


if __name__ == "__main__":
    main()
