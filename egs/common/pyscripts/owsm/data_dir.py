"""Kaldi-style data dirs in the form ESPnet's speech-to-text (OWSM) task reads.

    wav.scp       utt  audio path (16 kHz; read by ESPnet's ``sound`` type, i.e. soundfile)
    text          utt  <eng><asr><notimestamps> TRANSCRIPT     decoder target, OWSM's prefix
    text.prev     utt  <na>                                    no previous-sentence prompt
    text.ctc      utt  TRANSCRIPT                              CTC target, no special tokens
    utt2spk spk2utt utt2domain utt2dur
    speech_shape  utt  number of samples                       ESPnet's batch sampler reads it

Every file is sorted by its first column (C locale order); utterance ids start with the speaker
id, so ``spk2utt`` lists each speaker's utterances in the same order as ``utt2spk``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

NA_SYMBOL = "<na>"
NOTIME_SYMBOL = "<notimestamps>"


class CorpusError(Exception):
    """A corpus path or file that cannot be prepared; the message says what was expected."""


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    speaker: str
    audio: str
    text: str
    samples: int
    fs: int
    domain: str


@dataclass(frozen=True)
class Dropped:
    utt_id: str
    reason: str


def write_data_dir(path: Path, utterances: Iterable[Utterance], lang_sym: str, task_sym: str) -> None:
    """Write every file of the module docstring for ``utterances`` into ``path``."""
    rows = sorted(utterances, key=lambda u: u.utt_id)
    _check(rows, path)
    prefix = f"{lang_sym}{task_sym}{NOTIME_SYMBOL}"
    columns = {
        "wav.scp": [u.audio for u in rows],
        "text": [f"{prefix} {u.text}" for u in rows],
        "text.prev": [NA_SYMBOL for _ in rows],
        "text.ctc": [u.text for u in rows],
        "utt2spk": [u.speaker for u in rows],
        "utt2domain": [u.domain for u in rows],
        "utt2dur": [f"{u.samples / u.fs:.3f}" for u in rows],
        "speech_shape": [str(u.samples) for u in rows],
    }
    path.mkdir(parents=True, exist_ok=True)
    for name, values in columns.items():
        _write_lines(path / name, [f"{u.utt_id} {value}" for u, value in zip(rows, values, strict=True)])
    by_speaker: dict[str, list[str]] = defaultdict(list)
    for u in rows:
        by_speaker[u.speaker].append(u.utt_id)
    _write_lines(path / "spk2utt", [f"{spk} {' '.join(by_speaker[spk])}" for spk in sorted(by_speaker)])


def write_dropped(path: Path, dropped: Iterable[Dropped]) -> None:
    """``utt reason`` for every utterance left out of a data dir, sorted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_lines(path, [f"{d.utt_id} {d.reason}" for d in sorted(dropped, key=lambda d: d.utt_id)])


def summary(split: str, kept: list[Utterance], dropped: list[Dropped]) -> str:
    """One line: utterances, hours and speakers kept; dropped utterances per reason."""
    hours = sum(u.samples / u.fs for u in kept) / 3600
    speakers = len({u.speaker for u in kept})
    reasons = Counter(d.reason for d in dropped)
    dropped_text = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none"
    return f"{split}: {len(kept)} utterances ({hours:.2f} h) of {speakers} speakers; dropped: {dropped_text}"


def _check(rows: list[Utterance], path: Path) -> None:
    ids = Counter(u.utt_id for u in rows)
    repeated = [utt for utt, n in ids.items() if n > 1]
    if repeated:
        raise CorpusError(f"{path}: utterance ids occur more than once: {repeated[:5]}")
    for u in rows:
        if not u.utt_id.startswith(f"{u.speaker}-"):
            raise CorpusError(f"{path}: utterance id {u.utt_id!r} does not start with {u.speaker!r}-")
        if not u.text or any(c.isspace() for c in u.utt_id + u.speaker):
            raise CorpusError(f"{path}: utterance {u.utt_id!r} has an empty transcript or a space in its id")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
