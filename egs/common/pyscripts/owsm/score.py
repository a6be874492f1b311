#!/usr/bin/env python3
"""Stage 5: word error rate of the base model and of every fine-tuned model; one table.

    WER = (S + D + I) / N, summed over the utterances of a test set (word-level Levenshtein)

References are the data dir's ``text.ctc`` (``text`` without its special tokens when there is no
``text.ctc``); hypotheses are ``<exp>/decode/<name>/<set>/text``. Both go through the recipes'
one normalisation (``scoring.normalize_words``), so case, punctuation and number format never
count. Breakdowns (``--breakdowns``, default ``domain``): a test set whose ``utt2<label>`` holds
more than one value also gets one WER per value, column ``<set> <value>`` for ``domain`` (L2-ARCTIC:
the speakers' first languages) and ``<set> <label> <value>`` for any other label (``spk``: the
speakers, Kaldi's ``utt2spk``; ``grade``: MyST's school grades, ``utt2grade`` from stage 1's
``--student_grades``). A set without the file gets no such columns. With a
set named ``source`` (speech of the kind the base model was trained on), ``forgetting`` is the
source WER of a model minus that of the base. Trainable parameters come from ``peft_budget.json``
of each PEFT run (full fine-tuning: every parameter of the model its config.yaml builds), the rank
or k of each PEFT run from its config.yaml. A run of a sweep (stage 3's ``--sweeps``: a row of
``<exp>/peft/budget.csv`` whose sweep is not ``main``) is scored like the others; when there is
one, the columns ``sweep`` and ``point`` (budget / x4, split / 0.5, allocation / encoder; ``-``
for the other runs) follow ``model``. Writes ``<exp>/results.md`` and ``<exp>/results.csv``.

With ``--cleaners whisper_en`` (the default), each set also gets ``<set> WER whisper_en`` (and
``forgetting whisper_en``): references and hypotheses first cleaned by ESPnet's ``TextCleaner``
with the cleaner ESPnet's published MyST numbers use (Whisper's English normaliser: fillers such as
um, uh and hmm dropped, British spellings and number words standardised; from openai-whisper), then
normalised as above. ``--cleaners none`` keeps the one normalisation only.

With ``--sclite auto`` (the default: when NIST's sclite is found, ``owsm.sclite``) or ``true``, each
set also gets ``<set> WER sclite``: the normalised words scored by sclite as ESPnet's s2t.sh scores
(``<exp>/decode/<name>/<set>/score_wer/{ref.trn,hyp.trn,result.txt}``, speakers from ``utt2spk``).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from kaldi_files import read_table
from markdown_table import markdown_table
from scoring import ErrorRate, normalize_words, utterance_errors

from owsm.sclite import ScliteError, find_sclite, score_with_sclite

BASE = "base"
MAIN = "main"  # the sweep of budget.csv's main runs
SOURCE = "source"
DOMAIN = "domain"
SPECIAL_TOKEN = re.compile(r"<[^<>\s]*>")
CLEANERS = ("whisper_en", "whisper_basic")  # ESPnet's TextCleaner names


class ScoreError(Exception):
    """Missing inputs; the message names the file and the stage that writes it."""


def references(data_dir: Path) -> dict[str, str]:
    ctc = data_dir / "text.ctc"
    texts = read_table(ctc if ctc.is_file() else data_dir / "text")
    return {utt: SPECIAL_TOKEN.sub(" ", text) for utt, text in texts.items()}


def word_errors(refs: dict[str, str], hyps: dict[str, str], utts: list[str]) -> dict[str, ErrorRate]:
    """Each utterance's word errors (normalised words), counted once for the set and every group."""
    return {utt: words for utt, (words, _) in zip(utts, utterance_errors(refs, hyps, utts), strict=True)}


def wer(errors: dict[str, ErrorRate], utts: list[str]) -> float:
    """WER in percent over ``utts`` (errors and reference words summed), to two decimals."""
    return round(ErrorRate.summed(errors[utt] for utt in utts).percent, 2)


def text_cleaner(name: str) -> Callable[[str], str]:
    """ESPnet's ``TextCleaner([name])`` (a Whisper cleaner needs openai-whisper)."""
    if name not in CLEANERS:
        raise ScoreError(f"--cleaners: unknown cleaner {name!r}; known: {', '.join(CLEANERS)} (or none)")
    try:
        import whisper.normalizers  # noqa: F401  (what ESPnet's Whisper cleaners import)
    except ImportError:
        raise ScoreError(
            f"the {name} cleaner is Whisper's text normaliser: install openai-whisper (the project's "
            "espnet extra has it: pip install -e '.[espnet]'), or score with --cleaners none"
        ) from None
    from espnet2.text.cleaner import TextCleaner

    return TextCleaner([name])


def cleaned(texts: dict[str, str], cleaner: Callable[[str], str]) -> dict[str, str]:
    return {utt: cleaner(text) for utt, text in texts.items()}


def normalised(texts: dict[str, str]) -> dict[str, str]:
    return {utt: normalize_words(text) for utt, text in texts.items()}


def breakdown(data_dir: Path, utts: list[str], label: str) -> dict[str, list[str]]:
    """Utterances per value of ``utt2<label>``, when the set has that file and more than one value;
    else empty. Values sort as numbers where they are numbers (grade 3 before grade 10)."""
    path = data_dir / f"utt2{label}"
    if not path.is_file():
        return {}
    value_of = read_table(path)
    groups: dict[str, list[str]] = {}
    for utt in utts:
        groups.setdefault(value_of.get(utt, "?"), []).append(utt)
    order = sorted(
        groups, key=lambda value: (not value.isdigit(), int(value) if value.isdigit() else 0, value)
    )
    return {value: groups[value] for value in order} if len(groups) > 1 else {}


def breakdown_column(set_name: str, label: str, value: str) -> str:
    """``<set> <value>`` for a domain, ``<set> <label> <value>`` for any other breakdown."""
    return f"{set_name} {value}" if label == DOMAIN else f"{set_name} {label} {value}"


def trainable_parameters(run_dir: Path) -> str:
    """What the run trained: the plugin's peft_budget.json, or every parameter of a full fine-tune
    (a config.yaml without a peft block); "?" without either."""
    budget = run_dir / "peft_budget.json"
    if budget.is_file():
        return f"{json.loads(budget.read_text())['trainable']:,}"
    config = run_dir / "config.yaml"
    if config.is_file() and "peft" not in yaml.safe_load(config.read_text()):
        from espnet_plugins.modules import build_meta_model

        return f"{sum(p.numel() for p in build_meta_model(config, 's2t').parameters()):,}"
    return "?"


def knob_setting(run_dir: Path) -> str:
    """The PEFT run's rank or k ("rank 7", "k 153", "k_ratio 0.4"), from its own config.yaml; "-"
    for full fine-tuning or without a config."""
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    if not config.get("peft"):
        return "-"
    from owsm.equal_budget import knob_setting as block_knob

    return "{} {}".format(*block_knob(config["peft"], config.get("peft_conf") or {}))


def sweep_points(exp: Path) -> dict[str, tuple[str, str]]:
    """{run name: (sweep, point)} of the sweep runs of ``<exp>/peft/budget.csv`` (stage 3)."""
    budget_csv = exp / "peft" / "budget.csv"
    if not budget_csv.is_file():
        return {}
    with budget_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {row["method"]: (row["sweep"], row["point"]) for row in rows if row.get("sweep", MAIN) != MAIN}


def result_rows(
    exp: Path,
    sets: dict[str, Path],
    names: list[str],
    cleaners: list[str] | None = None,
    breakdowns: tuple[str, ...] = (DOMAIN,),
    sclite: str | None = None,
) -> list[dict[str, object]]:
    """One row per model: its cost, its WER on each set (per value of each breakdown too) and after
    each cleaner, and its forgetting (and after each cleaner) when a ``source`` set is scored."""
    cleaner_of = {name: text_cleaner(name) for name in cleaners or []}
    rows: list[dict[str, object]] = []
    points = {name: point for name, point in sweep_points(exp).items() if name in names}
    for name in names:
        trainable, knob = (
            ("0", "-") if name == BASE else (trainable_parameters(exp / name), knob_setting(exp / name))
        )
        row: dict[str, object] = {"model": name}
        if points:
            row["sweep"], row["point"] = points.get(name, ("-", "-"))
        row.update({"trainable": trainable, "rank or k": knob})
        for set_name, data_dir in sets.items():
            refs = references(data_dir)
            hyp_file = exp / "decode" / name / set_name / "text"
            if not hyp_file.is_file():
                raise ScoreError(f"no hypotheses {hyp_file}: run the decoding stage for {name}")
            hyps = read_table(hyp_file)
            missing = len(set(refs) - set(hyps))
            if missing:
                print(f"score.py: warning: {hyp_file} lacks {missing} utterances (empty)", file=sys.stderr)
            utts = sorted(refs)
            errors = word_errors(refs, hyps, utts)
            row[f"{set_name} WER"] = wer(errors, utts)
            for cleaner_name, cleaner in cleaner_of.items():
                row[f"{set_name} WER {cleaner_name}"] = wer(
                    word_errors(cleaned(refs, cleaner), cleaned(hyps, cleaner), utts), utts
                )
            if sclite is not None:
                speakers = read_table(data_dir / "utt2spk") if (data_dir / "utt2spk").is_file() else {}
                counts = score_with_sclite(
                    sclite, hyp_file.parent / "score_wer", normalised(refs), normalised(hyps), utts, speakers
                )
                row[f"{set_name} WER sclite"] = round(counts.percent, 2)
            for label in breakdowns:
                for value, group in breakdown(data_dir, utts, label).items():
                    row[breakdown_column(set_name, label, value)] = wer(errors, group)
        rows.append(row)
    base = next((row for row in rows if row["model"] == BASE), None)
    if SOURCE in sets and base is not None:
        for suffix in ["", *(f" {name}" for name in cleaner_of)]:
            source = f"{SOURCE} WER{suffix}"
            for row in rows:
                row[f"forgetting{suffix}"] = round(float(row[source]) - float(base[source]), 2)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    return "\n".join(markdown_table(rows)) + "\n"


def parse_sets(text: str) -> dict[str, Path]:
    sets = {}
    for item in text.split():
        name, _, path = item.partition("=")
        if not path or not Path(path).is_dir():
            raise ScoreError(f"--sets wants name=data_dir pairs of existing dirs, got {item!r}")
        sets[name] = Path(path)
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp", type=Path, required=True, help="dir with decode/<name>/<set>/text")
    parser.add_argument("--sets", required=True, help="name=data_dir pairs, e.g. 'test=data/test'")
    parser.add_argument("--names", required=True, help="decoded models: base, the methods, the sweep runs")
    parser.add_argument(
        "--cleaners",
        default="whisper_en",
        help=f"ESPnet text cleaners scored beside the plain normalisation ({', '.join(CLEANERS)}), or none",
    )
    parser.add_argument(
        "--breakdowns",
        default=DOMAIN,
        help="labels of utt2<label> files to give a WER per value of (domain, spk, grade), or none",
    )
    parser.add_argument(
        "--sclite",
        choices=("auto", "true", "false"),
        default="auto",
        help="also score with NIST's sclite as ESPnet does (auto: when it is installed)",
    )
    args = parser.parse_args(argv)
    sclite = find_sclite() if args.sclite != "false" else None
    if args.sclite == "true" and sclite is None:
        print(
            "score.py: error: --sclite true but no sclite: install SCTK (Debian: apt-get install sctk; "
            "ESPnet: tools/installers/install_sctk.sh, then ESPNET_ROOT) or give --sclite auto",
            file=sys.stderr,
        )
        return 1
    cleaners = [] if args.cleaners.strip() in ("", "none") else args.cleaners.split()
    breakdowns = () if args.breakdowns.strip() in ("", "none") else tuple(args.breakdowns.split())
    try:
        rows = result_rows(args.exp, parse_sets(args.sets), args.names.split(), cleaners, breakdowns, sclite)
    except (ScoreError, ScliteError) as error:
        print(f"score.py: error: {error}", file=sys.stderr)
        return 1
    (args.exp / "results.md").write_text(markdown(rows), encoding="utf-8")
    with (args.exp / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
