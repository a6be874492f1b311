"""What each utterance is: text, voice and every random draw, fixed once so synthesis is reproducible.

A split named <domain>_<role> (source_train, accent_adapt, child_test, ...) takes the voices that
conf/domains.yaml lists for that domain and role; its sentences go to the voices in turn, so voices are
balanced. With voices_per_sentence r (a profile option per split, default 1) every sentence is spoken
by r different voices, the next r in turn: utterance i*r + j is sentence i spoken by voice (i*r + j)
mod (number of voices). Per utterance: speed and pitch shift drawn from the domain's ranges;
transformed voices (child voices, "<name>2" speakers) draw a pitch median and a duration factor; noisy
domains draw a noise kind, an SNR, maybe a room, and babble talkers from the babble voices of the split;
a domain with a ``channel`` (the telephone line of local/channel.py) passes every utterance through it.
The babble sentences go in turn to every babble voice, so the babble of the test split shares neither
talkers nor text with that of the adaptation splits.

Utterance ids are <voice>-<split>-<index>, so sorting by id groups speakers as Kaldi requires.
"""

from __future__ import annotations

import random
import zlib

BABBLE = "babble"


def domain_and_role(split: str) -> tuple[str, str]:
    domain, _, role = split.partition("_")
    return domain, role


def draw(rng: random.Random, bounds: list[float]) -> float:
    low, high = bounds
    return round(rng.uniform(low, high), 3)


def utterance_seed(utt: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{utt}".encode())


def babble_plan(sentences: list[str], voices: dict, seed: int) -> list[dict]:
    talkers = sorted(name for name in voices if name.startswith(f"{BABBLE}."))
    rows = []
    for index, text in enumerate(sentences):
        voice = talkers[index % len(talkers)]
        utt = f"{voice}-{BABBLE}-{index:05d}"
        rows.append(
            {
                "utt": utt,
                "split": BABBLE,
                "domain": BABBLE,
                "voice": voice,
                "text": text,
                "speed": 1.0,
                "semitones": 0.0,
                "transform": None,
                "noise": None,
                "level_dbfs": -25.0,
                "seed": utterance_seed(utt, seed),
            }
        )
    return rows


def noise_draw(rng: random.Random, noise: dict, role: str, babble_rows: list[dict]) -> dict:
    kinds, weights = zip(*noise["kinds"].items(), strict=True)
    kind = rng.choices(kinds, weights)[0]
    pool = [row["utt"] for row in babble_rows if row["voice"] in noise["babble_voices"][role]]
    talkers = []
    if "babble" in kind:
        low, high = noise["babble_talkers"]
        talkers = rng.choices(pool, k=rng.randint(low, high))
    room = None
    if rng.random() < noise["reverb_prob"]:
        room = {"rt60_s": draw(rng, noise["rt60_s"]), "drr_db": draw(rng, noise["drr_db"])}
    return {"kind": kind, "snr_db": draw(rng, noise["snr_db"]), "room": room, "babble": talkers}


def split_plan(
    split: str,
    sentences: list[str],
    conf: dict,
    seed: int,
    babble_rows: list[dict],
    voices_per_sentence: int = 1,
) -> list[dict]:
    """One row per (sentence, voice) of the split: the full recipe of its waveform."""
    domain, role = domain_and_role(split)
    spec = conf["domains"][domain]
    voices = spec["splits"][role]
    if not 1 <= voices_per_sentence <= len(voices):
        raise ValueError(
            f"voices_per_sentence of {split} is {voices_per_sentence}: it must be between 1 and the "
            f"{len(voices)} voices that conf/domains.yaml lists for {domain} {role}"
        )
    rng = random.Random(utterance_seed(split, seed))
    rows = []
    spoken = [text for text in sentences for _ in range(voices_per_sentence)]
    for index, text in enumerate(spoken):
        voice = voices[index % len(voices)]
        utt = f"{voice}-{split}-{index:05d}"
        spec_of_voice = conf["voices"][voice]
        transform = None
        if "base" in spec_of_voice:
            transform = {
                "formant_ratio": spec_of_voice["formant_ratio"],
                "pitch_hz": draw(rng, spec_of_voice["pitch_hz"]),
                "duration_factor": draw(rng, spec_of_voice["duration_factor"]),
            }
        noise = noise_draw(rng, spec["noise"], role, babble_rows) if "noise" in spec else None
        rows.append(
            {
                "utt": utt,
                "split": split,
                "domain": domain,
                "voice": voice,
                "text": text,
                "speed": draw(rng, spec["speed"]),
                "semitones": draw(rng, spec["semitones"]),
                "transform": transform,
                "noise": noise,
                "level_dbfs": draw(rng, [-30.0, -20.0]),
                "seed": utterance_seed(utt, seed),
            }
        )
        if "channel" in spec:
            rows[-1]["channel"] = spec["channel"]
    return rows
