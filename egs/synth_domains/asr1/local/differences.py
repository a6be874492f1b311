"""Stage 10: which differences of the results table are real. For every method and each reference
method (default: full fine-tuning, LoRA and SSVD, those that ran; SSVD makes SSVD-O's output-side
rotations and ESPnet master's SSVD a paired comparison with the exact SSVD), on each domain: its
target-test WER minus the reference's, and its source-test WER minus the reference's (forgetting),
each over the seeds of both cells (the main run and its seed runs), with a 95 % paired bootstrap
interval over the test's utterances (``significance.paired_bootstrap``: per utterance, the errors
averaged over each system's seeds; one draw for both systems). An interval that holds zero reads "no
difference".

Writes ``differences.csv`` and ``differences.md`` in the experiment dir.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from kaldi_files import read_table
from markdown_table import markdown_table
from runs import Run, read_runs
from score import cells, seed_errors
from significance import Interval, paired_bootstrap

COLUMNS = (
    "domain", "test", "method", "reference", "seeds", "WER difference", "95% low", "95% high", "verdict",
)  # fmt: skip


def verdict(difference: Interval, method: str, reference: str) -> str:
    if not difference.excludes_zero:
        return "no difference"
    return f"{method} {'worse' if difference.mean > 0 else 'better'} than {reference}"


def difference_rows(
    data: Path, exp: Path, runs: list[Run], domains: list[str], references: list[str], resamples: int
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    tests = {"target": lambda domain: f"{domain}_test", "source": lambda _: "source_test"}
    for domain in domains:
        for test, split in tests.items():
            texts = read_table(data / split(domain) / "text")
            errors = {
                method: seed_errors(exp, [run.name for run in cell], texts)
                for method, cell in cells(runs, domain).items()
            }
            for reference in references:
                if reference not in errors:
                    continue
                reference_errors, words = errors[reference]
                for method, (method_errors, _) in errors.items():
                    if method in references[: references.index(reference) + 1]:
                        continue  # itself, or a reference already compared with this one
                    difference = paired_bootstrap(method_errors, reference_errors, words, resamples)
                    rows.append(
                        {
                            "domain": domain,
                            "test": test,
                            "method": method,
                            "reference": reference,
                            "seeds": f"{len(method_errors)} / {len(reference_errors)}",
                            "WER difference": round(difference.mean, 2),
                            "95% low": round(difference.low, 2),
                            "95% high": round(difference.high, 2),
                            "verdict": verdict(difference, method, reference),
                        }
                    )
    return rows


def markdown(rows: list[dict[str, object]], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "WER of the method minus WER of the reference, in points, with the 95 % paired bootstrap "
        "interval over the test's utterances, each system's errors averaged over its seeds (seeds: the "
        "method's / the reference's).",
        "",
        *markdown_table(rows, COLUMNS),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="data dir: source_test, <domain>_test")
    parser.add_argument("--exp", type=Path, required=True, help="experiment dir of the run")
    parser.add_argument("--runs", type=Path, required=True, help="runs.tsv of local/finetune_configs.py")
    parser.add_argument("--domains", required=True, help="target domains, space-separated")
    parser.add_argument("--references", default="full lora ssvd", help="reference methods, space-separated")
    parser.add_argument("--resamples", type=int, default=10_000)
    args = parser.parse_args()
    runs, references = read_runs(args.runs), args.references.split()
    rows = difference_rows(args.data, args.exp, runs, args.domains.split(), references, args.resamples)
    with (args.exp / "differences.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (args.exp / "differences.md").write_text(markdown(rows, f"Paired differences: {args.exp}"))


if __name__ == "__main__":
    main()
