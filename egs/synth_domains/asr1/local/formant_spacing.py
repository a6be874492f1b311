"""Calibration aid for the child voices: formant spacing of each adult voice and of its child version.

For a uniform tube of length L, F_i = (i - 1/2) c / (2 L), so the spacing dF = c / (2 L) is estimated per
voiced frame as mean_i F_i / (i - 1/2) over F1..F4 (Praat Burg formants) and reported as the median over
frames and sentences. An 8-10 year old child (L ~ 12 cm) has dF ~ 1450 Hz; the formant_ratio of
child.<voice> in conf/domains.yaml is set so that the child version, measured the same way, lands there
(the ratio is not exactly child dF / adult dF: Change gender resamples and Burg estimates shift).

Usage: local/formant_spacing.py --domains conf/domains.yaml --text data/quick/local/text/source_dev.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import engines
import numpy as np
import voice_transforms
import yaml

CHILD_SPACING_HZ = 1450.0


def formant_spacing(audio: np.ndarray, rate: int, ceiling_hz: float) -> float:
    """Median over voiced frames of mean_i F_i / (i - 1/2), i = 1..4."""
    sound = voice_transforms.to_sound(audio, rate)
    formants = sound.to_formant_burg(max_number_of_formants=5, maximum_formant=ceiling_hz)
    pitch = sound.to_pitch()
    estimates = []
    for t in np.arange(0.05, sound.duration - 0.05, 0.01):
        values = [formants.get_value_at_time(i, t) for i in (1, 2, 3, 4)]
        if np.isfinite(pitch.get_value_at_time(t)) and np.all(np.isfinite(values)):
            estimates.append(np.mean([f / (i - 0.5) for i, f in zip((1, 2, 3, 4), values, strict=True)]))
    return float(np.median(estimates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True, help="sentences to speak, one a line")
    parser.add_argument("--sentences", type=int, default=12)
    args = parser.parse_args()
    voices = yaml.safe_load(args.domains.read_text())["voices"]
    sentences = args.text.read_text().splitlines()[: args.sentences]
    rate = engines.SAMPLE_RATE
    print(f"| child voice | adult dF Hz | formant_ratio | child dF Hz | child dF / {CHILD_SPACING_HZ:.0f} |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, spec in voices.items():
        if not name.startswith("child."):
            continue
        adult_dfs, child_dfs = [], []
        for text in sentences:
            adult = engines.synthesize(voices[spec["base"]], text)
            child = voice_transforms.change_gender(
                adult, rate, spec["formant_ratio"], np.mean(spec["pitch_hz"]), 1.0, seed=0
            )
            adult_dfs.append(formant_spacing(adult, rate, 5500.0))
            child_dfs.append(formant_spacing(child, rate, 8000.0))
        adult_df, child_df = np.median(adult_dfs), np.median(child_dfs)
        off = child_df / CHILD_SPACING_HZ
        print(f"| {name} | {adult_df:.0f} | {spec['formant_ratio']} | {child_df:.0f} | {off:.2f} |")


if __name__ == "__main__":
    main()
