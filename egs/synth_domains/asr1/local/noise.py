"""Synthetic acoustic conditions: pink noise, room responses, TTS babble, mixing at an SNR.

pink:    white Gaussian noise shaped by 1/sqrt(f) in the frequency domain (power ~ 1/f)
room:    h = delta(t) + g * n(t) * exp(-6.91 t / RT60),  n ~ N(0, 1), with g set so that the
         direct-to-reverberant energy ratio is DRR dB (energy falls 60 dB after RT60 seconds)
babble:  the sum of k talkers, each a random cyclic shift of a looped TTS sentence, equal RMS
mix:     y = s + a * n,  a chosen so that 10 log10(P_s / P_(a n)) = SNR
"""

from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

REVERB_TAIL_S = 0.25


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-12))


def pink_noise(length: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(length))
    scale = np.ones(spectrum.shape)
    scale[1:] = 1.0 / np.sqrt(np.arange(1, spectrum.size))
    noise = np.fft.irfft(spectrum * scale, n=length)
    return (noise / rms(noise)).astype(np.float32)


def room_response(rate: int, rt60_s: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(rate * rt60_s)) / rate
    tail = rng.standard_normal(t.size) * np.exp(-6.91 * t / rt60_s)
    tail[0] = 0.0
    tail *= np.sqrt(10.0 ** (-drr_db / 10.0) / np.sum(tail**2))
    tail[0] = 1.0
    return tail.astype(np.float32)


def reverberate(speech: np.ndarray, response: np.ndarray, rate: int) -> np.ndarray:
    """Speech convolved with the room, kept up to REVERB_TAIL_S past its end, at the dry level."""
    wet = fftconvolve(speech, response)[: speech.size + int(REVERB_TAIL_S * rate)]
    return (wet * rms(speech) / rms(wet)).astype(np.float32)


def babble(length: int, talkers: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    mixture = np.zeros(length, dtype=np.float64)
    for talker in talkers:
        looped = np.resize(talker, max(length, talker.size))
        mixture += np.roll(looped, int(rng.integers(looped.size)))[:length] / rms(talker)
    return (mixture / rms(mixture)).astype(np.float32)


def mix(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    gain = rms(speech) / (rms(noise) * 10.0 ** (snr_db / 20.0))
    return (speech + gain * noise[: speech.size]).astype(np.float32)
