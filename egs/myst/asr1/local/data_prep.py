#!/usr/bin/env python3
"""Stage 1: Kaldi-style data dirs of the MyST children's speech corpus (LDC2021S05).

    <corpus_dir>/data/{train,development,test}/<student_id>/<session_id>/<utt>.flac + <utt>.trn
    (or the LDC layout <corpus_dir>/myst_child_conv_speech/data/...)
      -> <data_dir>/{train,dev,test}/   (files: see egs/common/pyscripts/owsm/data_dir.py; domain "child")
         <data_dir>/local/dropped_<split>.txt   (utt reason)
      with --test_filter_list (ESPnet's egs2/myst/asr1/conf/file_list/test.list):
         <data_dir>/test_filter/                the test utterances the list names
         <data_dir>/local/test_filter_missing.txt   listed utterances that test does not hold
      with --student_grades (lines "<student_id> <grade>"):
         <data_dir>/<set>/utt2grade             each utterance's school grade (stage 5's per-grade WER)

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

ESPnet's published MyST numbers are on ``test_filter``: the test utterances of its list
``conf/file_list/test.list`` (chosen by a Whisper decoding: WER under 50 %, at least 3 words, at
most 30 s; 10,328 utterances), named by the file stem <utt>. With --test_filter_list that file (from
an ESPnet checkout) selects the same utterances from this recipe's test set; a listed utterance that
test does not hold (dropped here, or absent from this copy of the corpus) is written to
``local/test_filter_missing.txt`` and counted in the summary.

MyST's audio tree does not say which grade (3-5) a student is in; with --student_grades, a
two-column file of student ids and grades (from the corpus documentation or the study's own
records), every set gets ``utt2grade``, and stage 5 a WER per grade. A student of a kept utterance
that the file does not list stops stage 1 with the students named.
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


def read_utterance_list(path: Path) -> set[str]:
    """The utterance names (first field of each line) of an ESPnet file list."""
    if not path.is_file():
        raise CorpusError(
            f"--test_filter_list {path} does not exist; give egs2/myst/asr1/conf/file_list/test.list "
            "of an ESPnet checkout"
        )
    names = {line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    if not names:
        raise CorpusError(f"--test_filter_list {path} names no utterance")
    return names


def filtered_test(test: list[Utterance], listed: set[str]) -> tuple[list[Utterance], list[str]]:
    """(the test utterances whose <utt> of <student>-<utt> is listed, the listed names test lacks)."""
    kept = [u for u in test if u.utt_id.split("-", 1)[1] in listed]
    found = {u.utt_id.split("-", 1)[1] for u in kept}
    return kept, sorted(listed - found)


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


def read_student_grades(path: Path) -> dict[str, str]:
    """{student id: grade} of a file of ``<student_id> <grade>`` lines."""
    if not path.is_file():
        raise CorpusError(
            f"--student_grades {path} does not exist; give a file of '<student_id> <grade>' lines"
        )
    grades: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise CorpusError(f"--student_grades {path}:{number}: '{line}' is not '<student_id> <grade>'")
        grades[fields[0]] = fields[1]
    return grades


def check_grades(split: str, utterances: list[Utterance], grades: dict[str, str]) -> None:
    """Stop, naming them, when students of ``utterances`` have no grade in ``grades``."""
    unlisted = sorted({u.speaker for u in utterances} - set(grades))
    if unlisted:
        shown = " ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else "")
        raise CorpusError(f"--student_grades lists no grade for {len(unlisted)} students of {split}: {shown}")


def write_grades(set_dir: Path, utterances: list[Utterance], grades: dict[str, str]) -> None:
    """``<set_dir>/utt2grade``: the grade of each utterance's student, sorted by utterance."""
    lines = [f"{u.utt_id} {grades[u.speaker]}\n" for u in sorted(utterances, key=lambda u: u.utt_id)]
    (set_dir / "utt2grade").write_text("".join(lines), encoding="utf-8")


def write_test_filter(
    data_dir: Path, test: list[Utterance], listed: set[str], lang_sym: str, task_sym: str
) -> list[Utterance]:
    """``<data_dir>/test_filter`` and the list of listed utterances test lacks; its utterances."""
    kept, missing = filtered_test(test, listed)
    if not kept:
        raise CorpusError(f"no test utterance is named by --test_filter_list ({len(listed)} names)")
    missing_list = data_dir / "local" / "test_filter_missing.txt"
    missing_list.write_text("".join(f"{name}\n" for name in missing), encoding="utf-8")
    write_data_dir(data_dir / "test_filter", kept, lang_sym, task_sym)
    counts = f"{len(kept)} utterances of the {len(listed)} listed"
    print(f"test_filter: {counts} ({len(missing)} not in test: {missing_list})")
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus_dir", type=Path, required=True, help="root of the MyST corpus")
    parser.add_argument("--data_dir", type=Path, required=True, help="output: data/{train,dev,test}")
    parser.add_argument("--max_seconds", type=float, default=30.0, help="longer utterances are dropped")
    parser.add_argument("--lang_sym", default="<eng>", help="OWSM language token of the text prefix")
    parser.add_argument("--task_sym", default="<asr>", help="OWSM task token of the text prefix")
    parser.add_argument(
        "--test_filter_list", type=Path, help="ESPnet's egs2/myst/asr1/conf/file_list/test.list: test_filter"
    )
    parser.add_argument(
        "--student_grades", type=Path, help="'<student_id> <grade>' lines: utt2grade in every set"
    )
    args = parser.parse_args(argv)
    try:
        root = find_data_root(args.corpus_dir)
        listed = read_utterance_list(args.test_filter_list) if args.test_filter_list else None
        grades = read_student_grades(args.student_grades) if args.student_grades else None
        prepared = {split: prepare_split(root / name, args.max_seconds) for name, split in SPLITS.items()}
        if grades is not None:  # every student checked before anything is written
            for split, (kept, _, _) in prepared.items():
                check_grades(split, kept, grades)
        for corpus_split, split in SPLITS.items():
            kept, dropped, untranscribed = prepared[split]
            dropped_list = args.data_dir / "local" / f"dropped_{split}.txt"
            write_dropped(dropped_list, dropped)
            if not kept:
                raise CorpusError(f"{root / corpus_split}: no utterance is left; reasons in {dropped_list}")
            write_data_dir(args.data_dir / split, kept, args.lang_sym, args.task_sym)
            if grades is not None:
                write_grades(args.data_dir / split, kept, grades)
            print(f"{summary(split, kept, dropped)}; {untranscribed} flac files without a transcript")
            if split == "test" and listed is not None:
                filtered = write_test_filter(args.data_dir, kept, listed, args.lang_sym, args.task_sym)
                if grades is not None:
                    write_grades(args.data_dir / "test_filter", filtered, grades)
    except CorpusError as error:
        print(f"data_prep.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
