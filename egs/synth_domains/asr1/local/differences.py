"""Stage 10: which differences of the results table are real. For every main run and each reference
method (default: full fine-tuning and LoRA), on each domain: its target-test WER minus the
reference's, and its source-test WER minus the reference's (forgetting), each with a 95 % paired
bootstrap interval over the test's utterances (``significance.paired_bootstrap``; the same
utterances, one draw for both systems). An interval that holds zero reads "no difference".

Writes ``differences.csv`` and ``differences.md`` in the experiment dir.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from kaldi_files import read_table
from runs import Run, read_runs
from scoring import utterance_errors
from significance import Interval, paired_bootstrap

COLUMNS = ("domain", "test", "method", "reference", "WER difference", "95% low", "95% high", "verdict")


def word_errors(references: dict[str, str], hypotheses: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(errors, reference words) per utterance, in the references' order."""
    errors = utterance_errors(references, hypotheses)
    return np.array([w.errors for w, _ in errors]), np.array([w.length for w, _ in errors])


def verdict(difference: Interval, method: str, reference: str) -> str:
    if not difference.excludes_zero:
        return "no difference"
    return f"{method} {'worse' if difference.mean > 0 else 'better'} than {reference}"


def difference_rows(
    data: Path, exp: Path, runs: list[Run], domains: list[str], references: list[str], resamples: int
) -> list[dict[str, object]]:
    main = {(domain, r.method): r for r in runs if r.sweep == "main" for domain in r.tests}
    rows: list[dict[str, object]] = []
    tests = {"target": lambda domain: f"{domain}_test", "source": lambda _: "source_test"}
    for domain in domains:
        for test, split in tests.items():
            texts = read_table(data / split(domain) / "text")
            errors = {
                method: word_errors(texts, read_table(exp / "decode" / run.name / "1best_recog" / "text"))
                for (run_domain, method), run in main.items()
                if run_domain == domain
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
        "interval over the test's utterances (one seed per run).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(row[column]) for column in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="data dir: source_test, <domain>_test")
    parser.add_argument("--exp", type=Path, required=True, help="experiment dir of the run")
    parser.add_argument("--runs", type=Path, required=True, help="runs.tsv of local/finetune_configs.py")
    parser.add_argument("--domains", required=True, help="target domains, space-separated")
    parser.add_argument("--references", default="full lora", help="reference methods, space-separated")
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
