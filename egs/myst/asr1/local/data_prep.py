#!/usr/bin/env python3
"""Stage 1: Kaldi-style data dirs of the MyST children's speech corpus (LDC2021S05).

    <corpus_dir>/data/{train,development,test}/<student_id>/<session_id>/<utt>.flac + <utt>.trn
    (or the LDC layout <corpus_dir>/myst_child_conv_speech/data/...)
      -> <data_dir>/{train,dev,test}/   (files: see egs/common/pyscripts/owsm/data_dir.py; domain "child")
         <data_dir>/local/dropped_<split>.txt   (utt reason)

The speaker is the student (MyST's partitions are speaker-disjoint); utterance ids are
``<student_id>-<utt>``. A flac without a .trn (MyST transcribed 45 % of its utterances) is not
used. An utterance is dropped when its transcript is empty (``empty``), marks lost audio
(``<no_signal>`` or ``<discard>``: ``no_signal``), has no word left once the markup is removed
(``only_markup``), or its audio is longer than --max_seconds (``too_long``: OWSM's 30 s window),
is not 16 kHz (``not_16k``) or cannot be read (``unreadable_audio``).

Markup removed from a transcript before the words are normalised (scoring.normalize_words in
egs/common/pyscripts): unintelligible
spans ``(( ))`` with or without a guessed word, every other parenthesised note such as ``(*)``,
tags ``<breath>`` ``<noise>`` ``<side_speech>`` ... and ``[...]`` ``{...}``, and word fragments:
a token that starts or ends with ``+``, ``~`` or ``-`` (``+um``, ``wh~``, ``mag-``). As in
ESPnet's MyST recipe (egs2/myst/asr1), transcripts become upper case without punctuation.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import soundfile
from owsm.data_dir import CorpusError, Dropped, Utterance, summary, write_data_dir, write_dropped
from scoring import normalize_words

SPLITS = {"train": "train", "development": "dev", "test": "test"}
LAYOUTS = ("data", "myst_child_conv_speech/data")
FS = 16000
DOMAIN = "child"

LOST_AUDIO = re.compile(r"<\s*(no_signal|discard)\s*>", re.IGNORECASE)
INNERMOST_PARENS = re.compile(r"\([^()]*\)")
TAGS = re.compile(r"<[^<>]*>|\[[^\[\]]*\]|\{[^{}]*\}")
FRAGMENT_MARKS = "+~-"


def clean_transcript(raw: str) -> tuple[str, str]:
    """(normalised transcript, "") or ("", the reason the utterance is dropped)."""
    if not raw.strip():
        return "", "empty"
    if LOST_AUDIO.search(raw):
        return "", "no_signal"
    text = raw
    while INNERMOST_PARENS.search(text):
        text = INNERMOST_PARENS.sub(" ", text)
    text = TAGS.sub(" ", text)
    words = [w for w in text.split() if not (w[0] in FRAGMENT_MARKS or w[-1] in FRAGMENT_MARKS)]
    text = normalize_words(" ".join(words))
    return (text, "") if text else ("", "only_markup")


def find_data_root(corpus_dir: Path) -> Path:
    """The directory that holds MyST's partitions train/, development/ and test/."""
    if not corpus_dir.is_dir():
        raise CorpusError(f"--corpus_dir {corpus_dir} does not exist; {_expected(corpus_dir)}")
    for layout in LAYOUTS:
        root = corpus_dir / layout
        if all((root / split).is_dir() for split in SPLITS):
            return root
    found = sorted(p.name for p in corpus_dir.iterdir())[:10]
    raise CorpusError(f"{corpus_dir} is not the MyST corpus (it holds {found}); {_expected(corpus_dir)}")


def _expected(corpus_dir: Path) -> str:
    return (
        f"expected {corpus_dir}/data/{{train,development,test}}/<student_id>/<session_id>/<utt>.flac "
        f"with <utt>.trn next to each flac (or the LDC release layout "
        f"{corpus_dir}/myst_child_conv_speech/data/...)"
    )


def prepare_split(split_dir: Path, max_seconds: float) -> tuple[list[Utterance], list[Dropped], int]:
    """(kept utterances, dropped ones, number of flac files without a transcript)."""
    flacs = sorted(split_dir.glob("*/*/*.flac"))
    if not flacs:
        raise CorpusError(
            f"no <student_id>/<session_id>/<utt>.flac under {split_dir}; is the corpus fully extracted?"
        )
    kept: list[Utterance] = []
    dropped: list[Dropped] = []
    untranscribed = 0
    for flac in flacs:
        trn = flac.with_suffix(".trn")
        if not trn.is_file():
            untranscribed += 1
            continue
        speaker = flac.parent.parent.name
        utt_id = f"{speaker}-{flac.stem}"
        text, reason = clean_transcript(trn.read_text(encoding="utf-8", errors="replace"))
        if not reason:
            samples, reason = _audio_length(flac, max_seconds)
        if reason:
            dropped.append(Dropped(utt_id, reason))
            continue
        kept.append(Utterance(utt_id, speaker, str(flac.resolve()), text, samples, FS, DOMAIN))
    return kept, dropped, untranscribed


def _audio_length(flac: Path, max_seconds: float) -> tuple[int, str]:
    """(samples, "") or (0, the reason the audio is not used)."""
    try:
        info = soundfile.info(str(flac))
    except RuntimeError:
        return 0, "unreadable_audio"
    if info.samplerate != FS:
        return 0, "not_16k"
    if info.frames > max_seconds * FS:
        return 0, "too_long"
    return info.frames, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus_dir", type=Path, required=True, help="root of the MyST corpus")
    parser.add_argument("--data_dir", type=Path, required=True, help="output: data/{train,dev,test}")
    parser.add_argument("--max_seconds", type=float, default=30.0, help="longer utterances are dropped")
    parser.add_argument("--lang_sym", default="<eng>", help="OWSM language token of the text prefix")
    parser.add_argument("--task_sym", default="<asr>", help="OWSM task token of the text prefix")
    args = parser.parse_args(argv)
    try:
        root = find_data_root(args.corpus_dir)
        for corpus_split, split in SPLITS.items():
            kept, dropped, untranscribed = prepare_split(root / corpus_split, args.max_seconds)
            dropped_list = args.data_dir / "local" / f"dropped_{split}.txt"
            write_dropped(dropped_list, dropped)
            if not kept:
                raise CorpusError(f"{root / corpus_split}: no utterance is left; reasons in {dropped_list}")
            write_data_dir(args.data_dir / split, kept, args.lang_sym, args.task_sym)
            print(f"{summary(split, kept, dropped)}; {untranscribed} flac files without a transcript")
    except CorpusError as error:
        print(f"data_prep.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
