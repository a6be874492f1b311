#!/usr/bin/env python3
"""Stage 1: Kaldi-style data dirs of L2-ARCTIC (non-native English, 24 speakers, 6 first languages).

    <corpus_dir>/<SPEAKER>/wav/arctic_a0001.wav + <corpus_dir>/<SPEAKER>/transcript/arctic_a0001.txt
      -> <data_dir>/{adapt,dev,test}/   (files: owsm/data_dir.py in egs/common/pyscripts; domain = L1)
         <data_dir>/local/dropped_<split>.txt   (utt reason)
         <audio_dir>/<SPEAKER>/<utt>.flac      (16 kHz copies; L2-ARCTIC is recorded at 44.1 kHz)

The split is speaker-disjoint and balanced over the first languages: per L1, two speakers adapt,
one validates and one tests (SPLITS; the dev and test speakers are the L2-ARCTIC split used by
mispronunciation-detection work). It is text-disjoint too: every speaker reads the same CMU ARCTIC
prompts, so each split reads its own (PROMPTS): adaptation set A (arctic_a0001-a0593), dev the
first half of set B (arctic_b0001-b0269), test the second half (arctic_b0270-b0539), so that neither
training nor the checkpoint choice on dev sees a test sentence; a recording of another split's
prompts is left out (``other_split_prompt``) and never resampled.
Utterance ids are ``<SPEAKER>-<utt>``. OWSM reads 16 kHz audio,
so every recording at another rate is resampled once (polyphase filter, scipy.signal.resample_poly)
into --audio_dir as 16-bit FLAC, and wav.scp points at the copy; a recording already at 16 kHz is
used where it is. Copies newer than their source are kept, so a second run only lists them.
An utterance is dropped when its transcript is missing (``no_transcript``) or has no word
(``empty``), or its audio cannot be read (``unreadable_audio``). Transcripts become upper case
without punctuation (scoring.normalize_words, egs/common/pyscripts).
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
from owsm.data_dir import CorpusError, Dropped, Utterance, summary, write_data_dir, write_dropped
from scipy.signal import resample_poly
from scoring import normalize_words

FS = 16000
SPEAKERS = {  # speaker: (first language, gender), from the L2-ARCTIC v5 README
    "ABA": ("arabic", "M"), "SKA": ("arabic", "F"), "YBAA": ("arabic", "M"), "ZHAA": ("arabic", "F"),
    "BWC": ("mandarin", "M"), "LXC": ("mandarin", "F"), "NCC": ("mandarin", "F"), "TXHC": ("mandarin", "M"),
    "ASI": ("hindi", "M"), "RRBI": ("hindi", "M"), "SVBI": ("hindi", "F"), "TNI": ("hindi", "F"),
    "HJK": ("korean", "F"), "HKK": ("korean", "M"), "YDCK": ("korean", "F"), "YKWK": ("korean", "M"),
    "EBVS": ("spanish", "M"), "ERMS": ("spanish", "M"), "MBMPS": ("spanish", "F"), "NJS": ("spanish", "F"),
    "HQTV": ("vietnamese", "M"), "PNV": ("vietnamese", "F"),
    "THV": ("vietnamese", "F"), "TLV": ("vietnamese", "M"),
}  # fmt: skip
PROMPTS = {  # split: (prompt set, first and last prompt number)
    "adapt": ("arctic_a", 1, 593),
    "dev": ("arctic_b", 1, 269),
    "test": ("arctic_b", 270, 539),
}
SPLITS = {
    "adapt": ("ABA", "SKA", "BWC", "LXC", "ASI", "RRBI", "HJK", "HKK", "EBVS", "ERMS", "HQTV", "PNV"),
    "dev": ("YBAA", "NCC", "SVBI", "YDCK", "MBMPS", "THV"),
    "test": ("ZHAA", "TXHC", "TNI", "YKWK", "NJS", "TLV"),
}


def check_corpus(corpus_dir: Path) -> None:
    """Every speaker directory with its wav/ and transcript/ folders, or one error naming what is missing."""
    expected = (
        f"expected {corpus_dir}/<SPEAKER>/wav/arctic_a0001.wav and "
        f"{corpus_dir}/<SPEAKER>/transcript/arctic_a0001.txt for the 24 speakers {' '.join(SPEAKERS)}"
    )
    if not corpus_dir.is_dir():
        raise CorpusError(f"--corpus_dir {corpus_dir} does not exist; {expected}")
    missing = [s for s in SPEAKERS if not (corpus_dir / s / "wav").is_dir()]
    if missing:
        zipped = [s for s in missing if (corpus_dir / f"{s}.zip").is_file()]
        hint = f"; unzip {' '.join(f'{s}.zip' for s in zipped)} in {corpus_dir} first" if zipped else ""
        raise CorpusError(f"{corpus_dir}: no wav/ folder for speakers {' '.join(missing)}{hint}; {expected}")


def read_transcript(path: Path) -> tuple[str, str]:
    """(normalised transcript, "") or ("", the reason the utterance is dropped)."""
    if not path.is_file():
        return "", "no_transcript"
    text = normalize_words(path.read_text(encoding="utf-8", errors="replace"))
    return (text, "") if text else ("", "empty")


def audio_entry(wav: Path, audio_dir: Path) -> tuple[str, int]:
    """(wav.scp path of 16 kHz audio, its number of samples); resamples into audio_dir if needed."""
    info = soundfile.info(str(wav))
    if info.samplerate == FS:
        return str(wav.resolve()), info.frames
    target = audio_dir / wav.parent.parent.name / f"{wav.stem}.flac"
    if not target.is_file() or target.stat().st_mtime < wav.stat().st_mtime:
        audio, rate = soundfile.read(str(wav), dtype="float32")
        step = math.gcd(FS, rate)
        resampled = resample_poly(audio, FS // step, rate // step, axis=0)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.flac")
        soundfile.write(str(partial), np.clip(resampled, -1.0, 1.0), FS, subtype="PCM_16")
        partial.replace(target)
    return str(target.resolve()), soundfile.info(str(target)).frames


def reads_prompts(stem: str, prompts: tuple[str, int, int]) -> bool:
    """Whether the recording ``stem`` (such as arctic_b0123) reads one of ``prompts``."""
    prompt_set, first, last = prompts
    number = stem.removeprefix(prompt_set)
    return number != stem and number.isdigit() and first <= int(number) <= last


def prepare_speaker(
    corpus_dir: Path, audio_dir: Path, speaker: str, prompts: tuple[str, int, int]
) -> tuple[list[Utterance], list[Dropped]]:
    """The speaker's utterances of ``prompts`` (a value of PROMPTS) and the dropped ones."""
    wavs = sorted((corpus_dir / speaker / "wav").glob("*.wav"))
    if not wavs:
        raise CorpusError(f"no .wav files in {corpus_dir / speaker / 'wav'}")
    kept: list[Utterance] = []
    dropped: list[Dropped] = []
    for wav in wavs:
        utt_id = f"{speaker}-{wav.stem}"
        if not reads_prompts(wav.stem, prompts):
            dropped.append(Dropped(utt_id, "other_split_prompt"))
            continue
        text, reason = read_transcript(corpus_dir / speaker / "transcript" / f"{wav.stem}.txt")
        if reason:
            dropped.append(Dropped(utt_id, reason))
            continue
        try:
            path, samples = audio_entry(wav, audio_dir)
        except RuntimeError:
            dropped.append(Dropped(utt_id, "unreadable_audio"))
            continue
        kept.append(Utterance(utt_id, speaker, path, text, samples, FS, SPEAKERS[speaker][0]))
    return kept, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus_dir", type=Path, required=True, help="root of L2-ARCTIC (speaker folders)")
    parser.add_argument("--data_dir", type=Path, required=True, help="output: data/{adapt,dev,test}")
    parser.add_argument(
        "--audio_dir", type=Path, default=Path("dump/l2arctic_16k"), help="output: 16 kHz copies of the audio"
    )
    parser.add_argument("--nj", type=int, default=1, help="speakers prepared in parallel")
    parser.add_argument("--lang_sym", default="<eng>", help="OWSM language token of the text prefix")
    parser.add_argument("--task_sym", default="<asr>", help="OWSM task token of the text prefix")
    args = parser.parse_args(argv)
    try:
        check_corpus(args.corpus_dir)
        prompt_sets = {s: PROMPTS[split] for split, speakers in SPLITS.items() for s in speakers}
        with ProcessPoolExecutor(max_workers=max(args.nj, 1)) as pool:
            jobs = {
                s: pool.submit(prepare_speaker, args.corpus_dir, args.audio_dir, s, p)
                for s, p in prompt_sets.items()
            }
            results = {s: job.result() for s, job in jobs.items()}
        for split, split_speakers in SPLITS.items():
            kept = [u for s in split_speakers for u in results[s][0]]
            dropped = [d for s in split_speakers for d in results[s][1]]
            write_dropped(args.data_dir / "local" / f"dropped_{split}.txt", dropped)
            write_data_dir(args.data_dir / split, kept, args.lang_sym, args.task_sym)
            print(summary(split, kept, dropped))
    except CorpusError as error:
        print(f"data_prep.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
