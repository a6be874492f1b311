"""NIST's sclite (SCTK) on one decoding, as ESPnet's s2t.sh / asr.sh score: ``ref.trn`` and
``hyp.trn`` (``WORDS (<speaker>-<utt>)`` per line) in ``<score_dir>``, then

    sclite -r ref.trn trn -h hyp.trn trn -i rm -o all stdout > result.txt

whose alignments and per-speaker table (SPKR) ESPnet users read. The word error rate is sclite's
own: errors (S + D + I) over reference words, from the ``Sum`` row of its raw counts. sclite aligns
with weighted costs (substitution 4, insertion and deletion 3), so on rare sentences it can count
one more error than the plain edit distance of ``scoring.error_rates``.

sclite is found on the PATH (ESPnet's ``tools/sctk/bin`` of a checkout, which path.sh puts there
with ESPNET_ROOT) or where Debian's ``sctk`` package keeps it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEBIAN_SCLITE = Path("/usr/lib/sctk/bin/sclite")
SUM_COUNTS = re.compile(
    r"^\s*\|\s*Sum\s*\|\s*(\d+)\s+(\d+)\s*\|\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*\|"
)


class ScliteError(Exception):
    """sclite failed or wrote no counts; the message names its result file."""


@dataclass(frozen=True)
class ScliteCounts:
    sentences: int
    words: int
    errors: int

    @property
    def percent(self) -> float:
        return 100.0 * self.errors / self.words if self.words else 0.0


def find_sclite() -> str | None:
    """The sclite program: on the PATH, else Debian's sctk; None without either."""
    found = shutil.which("sclite")
    if found:
        return found
    return str(DEBIAN_SCLITE) if DEBIAN_SCLITE.is_file() else None


def trn_lines(texts: dict[str, str], speakers: dict[str, str], utts: list[str]) -> list[str]:
    """``WORDS (<speaker>-<utt>)`` for every utterance (an empty text for a missing one)."""
    return [f"{texts.get(utt, '')} ({speakers.get(utt, utt)}-{utt})\n" for utt in utts]


def score_with_sclite(
    sclite: str,
    score_dir: Path,
    refs: dict[str, str],
    hyps: dict[str, str],
    utts: list[str],
    speakers: dict[str, str],
) -> ScliteCounts:
    """Write ``ref.trn``, ``hyp.trn`` and ``result.txt`` into ``score_dir``; sclite's counts."""
    score_dir.mkdir(parents=True, exist_ok=True)
    (score_dir / "ref.trn").write_text("".join(trn_lines(refs, speakers, utts)), encoding="utf-8")
    (score_dir / "hyp.trn").write_text("".join(trn_lines(hyps, speakers, utts)), encoding="utf-8")
    result = score_dir / "result.txt"
    command = [sclite, "-r", "ref.trn", "trn", "-h", "hyp.trn", "trn", "-i", "rm", "-o", "all", "stdout"]
    with result.open("w", encoding="utf-8") as out:
        finished = subprocess.run(command, cwd=score_dir, stdout=out, stderr=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        raise ScliteError(f"sclite failed on {score_dir}: {finished.stderr.strip()[-500:]}")
    for line in result.read_text(encoding="utf-8").splitlines():
        if match := SUM_COUNTS.match(line):
            return ScliteCounts(sentences=int(match[1]), words=int(match[2]), errors=int(match[7]))
    raise ScliteError(f"no Sum row of raw counts in {result}")
