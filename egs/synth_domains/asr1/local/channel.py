"""A telephone channel: what a narrowband (G.711) call does to wideband speech.

    y = up_rate( mulaw^-1( Q_8( mulaw( bandpass_band( down_codec(x / peak) ) ) ) ) ) * peak

down/up: polyphase resampling between the speech rate and the codec rate (8 kHz); bandpass: a
4th-order Butterworth band (300-3400 Hz, the telephone band), causal as a line filter is;
mulaw: G.711 companding, F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu) with mu = 255, quantised to
8 bits (256 levels) and expanded again. The peak scaling keeps |x| <= 1 for the codec.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import butter, resample_poly, sosfilt

MU = 255.0
LEVELS = 127.0  # 8-bit codes: sign and 7 bits of magnitude


def mulaw_roundtrip(x: np.ndarray, mu: float = MU) -> np.ndarray:
    """x in [-1, 1] companded, quantised to 8 bits and expanded (G.711 mu-law)."""
    companded = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    quantised = np.round(companded * LEVELS) / LEVELS
    return np.sign(quantised) * np.expm1(np.abs(quantised) * math.log1p(mu)) / mu


def telephone(
    audio: np.ndarray, rate: int, band_hz: tuple[float, float] = (300.0, 3400.0), codec_rate: int = 8000
) -> np.ndarray:
    """``audio`` at ``rate`` through a telephone line (see the module docstring), at ``rate`` again."""
    low, high = band_hz
    if not 0 < low < high < codec_rate / 2:
        raise ValueError(f"band_hz {band_hz} must lie inside (0, {codec_rate / 2}) Hz, low < high")
    divisor = math.gcd(rate, codec_rate)
    peak = max(float(np.abs(audio).max()), 1e-9)
    narrow = resample_poly(audio / peak, codec_rate // divisor, rate // divisor)
    band = sosfilt(butter(4, [low, high], btype="bandpass", fs=codec_rate, output="sos"), narrow)
    coded = mulaw_roundtrip(np.clip(band, -1.0, 1.0))
    wide = resample_poly(coded, rate // divisor, codec_rate // divisor)[: audio.size]
    return (wide * peak).astype(np.float32)
