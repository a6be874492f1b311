"""A tiny synthetic Kaldi-style ASR corpus: each character is a tone, so the task is learnable.

An utterance of 2-4 characters from ``a b c d`` is the concatenation of 80 ms tones, one per
character at that character's frequency, separated by 20 ms of silence, at 8 kHz. The
``shift`` of a domain scales every frequency (a "child speech" pitch shift), so a model
trained on one domain has something to adapt to on another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

SAMPLE_RATE = 8000
CHARACTERS = "abcd"
FREQUENCIES = (500.0, 900.0, 1300.0, 1700.0)
TONE_SECONDS = 0.08
GAP_SECONDS = 0.02
TOKENS = ("<blank>", "<unk>", *CHARACTERS, "<sos/eos>")


def waveform(text: str, shift: float, rng: np.random.Generator) -> np.ndarray:
    """The tones of ``text`` at frequencies scaled by ``shift``, with a little noise."""
    time = np.arange(int(TONE_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE))
    pieces = [gap]
    for char in text:
        frequency = FREQUENCIES[CHARACTERS.index(char)] * shift
        pieces += [0.5 * np.sin(2 * np.pi * frequency * time + rng.uniform(0, 2 * np.pi)), gap]
    signal = np.concatenate(pieces)
    return (signal + 0.01 * rng.standard_normal(signal.shape)).astype(np.float32)


def write_data_dir(path: Path, num_utterances: int, shift: float, seed: int) -> Path:
    """A Kaldi-style data dir (wav.scp, text, utt2spk) plus the speech/text shape files."""
    rng = np.random.default_rng(seed)
    (path / "wav").mkdir(parents=True)
    rows: dict[str, list[str]] = {
        "wav.scp": [],
        "text": [],
        "utt2spk": [],
        "speech_shape": [],
        "text_shape": [],
    }
    for index in range(num_utterances):
        utt = f"spk{index % 2}-utt{index:03d}"
        text = "".join(rng.choice(list(CHARACTERS), size=rng.integers(2, 5)))
        audio = waveform(text, shift, rng)
        wav = path / "wav" / f"{utt}.wav"
        soundfile.write(wav, audio, SAMPLE_RATE)
        rows["wav.scp"].append(f"{utt} {wav}")
        rows["text"].append(f"{utt} {text}")
        rows["utt2spk"].append(f"{utt} spk{index % 2}")
        rows["speech_shape"].append(f"{utt} {len(audio)}")
        rows["text_shape"].append(f"{utt} {len(text)}")
    for name, lines in rows.items():
        (path / name).write_text("\n".join(lines) + "\n")
    return path


def write_token_list(path: Path) -> Path:
    path.write_text("\n".join(TOKENS) + "\n")
    return path
