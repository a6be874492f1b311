"""Stage 6: ESPnet's ``speech_shape`` file (``utt num_samples``) in each Kaldi data dir.

The models normalise each utterance (``utterance_mvn``), so no feature statistics are
collected; the shape file is all ESPnet's batch sampler needs. Sample counts are read from the
wav headers, so a data dir given by the user (16 kHz wav files) works as well.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import soundfile as sf


def write_speech_shape(data_dir: Path) -> int:
    """``<data_dir>/speech_shape`` from ``<data_dir>/wav.scp``; the number of utterances."""
    rows = [line.split(maxsplit=1) for line in (data_dir / "wav.scp").read_text().splitlines() if line]
    lines = [f"{utt} {sf.info(path.strip()).frames}" for utt, path in rows]
    (data_dir / "speech_shape").write_text("\n".join(lines) + "\n")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dirs", type=Path, nargs="+")
    args = parser.parse_args()
    for data_dir in args.data_dirs:
        print(f"{data_dir}: {write_speech_shape(data_dir)} utterances")


if __name__ == "__main__":
    main()
