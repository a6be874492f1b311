"""Stage 10: WER and CER of every model on each target test and the source test; one results table.

    WER = (S + D + I) / N over all words of a test split (word-level Levenshtein alignment)
    CER = the same over characters, spaces included (ESPnet's char tokens count <space>)
    forgetting = source WER after adaptation - source WER of the base model (zero-shot)

Rows: per target domain, the base model (zero-shot) and every fine-tuning method. Writes
``results.csv``, ``results.md`` and ``learning_vs_forgetting.png`` (target WER against source WER,
one point per method, one panel per domain) into the experiment dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

BASE = "base"
COLUMNS = (
    "domain", "method", "trainable params", "target WER", "target CER", "source WER", "source CER",
    "forgetting (source WER change)", "train seconds", "peak memory MB",
)  # fmt: skip
TRAINABLE_LINE = re.compile(r"trainable in all: ([\d,]+) of")


@dataclass(frozen=True)
class ErrorRate:
    errors: int
    length: int

    @property
    def percent(self) -> float:
        return 100.0 * self.errors / max(self.length, 1)


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Substitutions + deletions + insertions of the best alignment."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        current = [i]
        for j, hyp in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def read_text(path: Path) -> dict[str, str]:
    rows = (line.split(maxsplit=1) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {row[0]: row[1].strip() if len(row) > 1 else "" for row in rows}


def error_rates(references: dict[str, str], hypotheses: dict[str, str]) -> tuple[ErrorRate, ErrorRate]:
    """(WER, CER) of ``hypotheses`` on every utterance of ``references`` (a missing one is empty)."""
    word_errors = word_count = char_errors = char_count = 0
    for utt, reference in references.items():
        hypothesis = hypotheses.get(utt, "")
        word_errors += edit_distance(reference.split(), hypothesis.split())
        word_count += len(reference.split())
        char_errors += edit_distance(list(reference), list(hypothesis))
        char_count += len(reference)
    return ErrorRate(word_errors, word_count), ErrorRate(char_errors, char_count)


def trainable_parameters(run_dir: Path, method: str, planned: dict[str, int]) -> int:
    """The count the plugin logged in peft_budget.txt; for full fine-tuning, the model's size."""
    budget_file = run_dir / "peft_budget.txt"
    if method != "full" and budget_file.exists():
        match = TRAINABLE_LINE.search(budget_file.read_text())
        if match:
            return int(match.group(1).replace(",", ""))
    return planned[method]


def result_rows(data: Path, exp: Path, domains: list[str], methods: list[str]) -> list[dict[str, object]]:
    source_refs = read_text(data / "source_test" / "text")
    base_hyps = read_text(exp / "decode" / BASE / "1best_recog" / "text")
    base_source = error_rates(source_refs, base_hyps)
    planned = json.loads((exp / "finetune_conf" / "trainable.json").read_text())
    rows: list[dict[str, object]] = []
    for domain in domains:
        target_refs = read_text(data / f"{domain}_test" / "text")
        rows.append(row(domain, BASE, 0, error_rates(target_refs, base_hyps), base_source, base_source, None))
        for method in methods:
            hyps = read_text(exp / "decode" / f"{domain}_{method}" / "1best_recog" / "text")
            run_dir = exp / domain / method
            rows.append(
                row(
                    domain,
                    method,
                    trainable_parameters(run_dir, method, planned),
                    error_rates(target_refs, hyps),
                    error_rates(source_refs, hyps),
                    base_source,
                    json.loads((run_dir / "train_stats.json").read_text()),
                )
            )
    return rows


def row(
    domain: str,
    method: str,
    trainable: int,
    target: tuple[ErrorRate, ErrorRate],
    source: tuple[ErrorRate, ErrorRate],
    base_source: tuple[ErrorRate, ErrorRate],
    stats: dict[str, float] | None,
) -> dict[str, object]:
    """One table row from (WER, CER) pairs; train seconds and peak memory are empty for the base."""
    values = (
        domain, method, trainable, round(target[0].percent, 2), round(target[1].percent, 2),
        round(source[0].percent, 2), round(source[1].percent, 2),
        round(source[0].percent - base_source[0].percent, 2),
        "" if stats is None else stats["seconds"], "" if stats is None else stats["peak_memory_mb"],
    )  # fmt: skip
    return dict(zip(COLUMNS, values, strict=True))


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict[str, object]], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
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
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="data dir: source_test, <domain>_test")
    parser.add_argument("--exp", type=Path, required=True, help="experiment dir of the run")
    parser.add_argument("--domains", required=True, help="target domains, space-separated")
    parser.add_argument("--methods", required=True, help="fine-tuning methods, space-separated")
    args = parser.parse_args()
    domains, methods = args.domains.split(), args.methods.split()
    rows = result_rows(args.data, args.exp, domains, methods)
    write_csv(rows, args.exp / "results.csv")
    (args.exp / "results.md").write_text(markdown(rows, f"Learning vs forgetting: {args.exp}"))
    plot(rows, domains, args.exp / "learning_vs_forgetting.png")
    print((args.exp / "results.md").read_text())


if __name__ == "__main__":
    main()
