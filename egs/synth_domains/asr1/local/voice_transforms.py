"""Voice transforms with Praat's "Change gender" (PSOLA pitch + formant scaling) through parselmouth.

Change gender(min pitch, max pitch, formant shift ratio, new pitch median, pitch range factor, duration
factor): formants are multiplied by the ratio (vocal tract length / ratio), the pitch contour is moved to
the new median, and the duration is multiplied by the factor (>1 is slower).

    change(x)      = Change gender(x; 75, 600, formant_ratio, pitch_hz, 1.0, duration_factor)
    shift(x, s)    = Change gender(x; 75, 600, 1.0, 2^(s/12) * median_f0(x), 1.0, 1.0)

Praat's overlap-add draws random numbers (voiceless stretches), so every transform first seeds Praat's
generator with the utterance's seed: the same input and seed give the same samples in any process.

change() makes child-like speech (F0 ~280-330 Hz, formant ratio ~1.4-1.45 from an adult male voice,
~1.1-1.15 from an adult female one, slower) or another adult speaker (formant ratio ~0.88 or ~1.12 with
an adult F0). sox pitch cannot do this: it moves formants and F0 together.
"""

from __future__ import annotations

import numpy as np
import parselmouth
from parselmouth.praat import call

PITCH_FLOOR = 75.0
PITCH_CEILING = 600.0


def to_sound(audio: np.ndarray, rate: int) -> parselmouth.Sound:
    return parselmouth.Sound(audio.astype(np.float64), sampling_frequency=rate)


def median_f0(
    audio: np.ndarray, rate: int, floor: float = PITCH_FLOOR, ceiling: float = PITCH_CEILING
) -> float:
    """Median F0 in Hz over voiced frames (NaN when nothing is voiced)."""
    pitch = to_sound(audio, rate).to_pitch(pitch_floor=floor, pitch_ceiling=ceiling)
    return float(call(pitch, "Get quantile", 0, 0, 0.5, "Hertz"))


def change_gender(
    audio: np.ndarray, rate: int, formant_ratio: float, pitch_hz: float, duration_factor: float, seed: int
) -> np.ndarray:
    """Formants times formant_ratio, pitch median moved to pitch_hz, duration times duration_factor."""
    parselmouth.praat.run(f"random_initializeWithSeedUnsafelyButPredictably ({seed})")
    sound = call(
        to_sound(audio, rate),
        "Change gender",
        PITCH_FLOOR,
        PITCH_CEILING,
        formant_ratio,
        pitch_hz,
        1.0,
        duration_factor,
    )
    return sound.values[0].astype(np.float32)


def shift_pitch(audio: np.ndarray, rate: int, semitones: float, seed: int) -> np.ndarray:
    """Pitch moved by semitones with formants and duration kept (unchanged when unvoiced)."""
    f0 = median_f0(audio, rate)
    if semitones == 0.0 or not np.isfinite(f0):
        return audio
    return change_gender(audio, rate, 1.0, f0 * 2.0 ** (semitones / 12.0), 1.0, seed)
