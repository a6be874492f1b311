"""Stage 2: synthesize every planned utterance to <synth_dir>/<split>/<utt>.wav (16 kHz, mono, 16 bit).

Babble talkers are synthesized first (the noisy domain mixes them in). Work is spread over --nj
processes; an utterance whose wav exists is skipped (a wav whose plan changed, or has no stored plan,
is deleted first), and a wav appears only once complete, so an interrupted run resumes where it
stopped. The plan of every split is written as JSON lines to <synth_dir>/plan/<split>.jsonl and is
what stage 3 reads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time
from pathlib import Path

import channel
import engines
import noise
import numpy as np
import plan
import soundfile as sf
import voice_transforms
import yaml

RATE = engines.SAMPLE_RATE
CONF: dict = {}
SYNTH_DIR = Path()


def wav_path(synth_dir: Path, row: dict) -> Path:
    return synth_dir / row["split"] / f"{row['utt']}.wav"


def corrupt(speech: np.ndarray, spec: dict, rng: np.random.Generator) -> np.ndarray:
    if spec["room"]:
        room = noise.room_response(RATE, spec["room"]["rt60_s"], spec["room"]["drr_db"], rng)
        speech = noise.reverberate(speech, room, RATE)
    parts = []
    if "babble" in spec["kind"]:
        talkers = [
            sf.read(SYNTH_DIR / plan.BABBLE / f"{utt}.wav", dtype="float32")[0] for utt in spec["babble"]
        ]
        parts.append(noise.babble(speech.size, talkers, rng))
    if "pink" in spec["kind"]:
        parts.append(noise.pink_noise(speech.size, rng))
    return noise.mix(speech, sum(parts) / np.sqrt(len(parts)), spec["snr_db"])


def at_level(audio: np.ndarray, level_dbfs: float) -> np.ndarray:
    """Scaled to an RMS of level_dbfs, then down if needed so the peak stays below 0.99."""
    audio = audio * (10.0 ** (level_dbfs / 20.0) / noise.rms(audio))
    return (audio / max(1.0, float(np.abs(audio).max()) / 0.99)).astype(np.float32)


def render(row: dict) -> np.ndarray:
    spec = CONF["voices"][row["voice"]]
    base = CONF["voices"][spec["base"]] if "base" in spec else spec
    audio = engines.synthesize(base, row["text"], row["speed"], row["seed"])
    if row["semitones"]:
        audio = voice_transforms.shift_pitch(audio, RATE, row["semitones"], row["seed"])
    if row["transform"]:
        audio = voice_transforms.change_gender(audio, RATE, **row["transform"], seed=row["seed"])
    if row["noise"]:
        audio = corrupt(audio, row["noise"], np.random.default_rng(row["seed"]))
    if row.get("channel"):
        audio = channel.telephone(audio, RATE, **row["channel"])
    return at_level(audio, row["level_dbfs"])


def synthesize_one(row: dict) -> tuple[float, bool]:
    """(seconds of audio, whether it was made now) for one utterance."""
    path = wav_path(SYNTH_DIR, row)
    if path.exists():
        return sf.info(path).duration, False
    audio = render(row)
    partial = path.with_suffix(".partial.wav")
    sf.write(partial, audio, RATE, subtype="PCM_16")
    os.replace(partial, path)
    return audio.size / RATE, True


def forget_changed(rows: list[dict]) -> None:
    """Delete the wav of every utterance whose plan differs from the stored one, has no stored plan (a wav
    left by an earlier, larger plan), or mixes in such babble; and every wav in a planned split's
    directory that the plan no longer has (an utterance id of an earlier plan, e.g. another voice)."""
    old = {}
    for path in (SYNTH_DIR / "plan").glob("*.jsonl"):
        old.update((r["utt"], r) for r in map(json.loads, path.read_text().splitlines()))
    changed = {row["utt"] for row in rows if old.get(row["utt"]) != row}
    changed |= {row["utt"] for row in rows if row["noise"] and changed.intersection(row["noise"]["babble"])}
    stale = [wav_path(SYNTH_DIR, row) for row in rows if row["utt"] in changed]
    stale = [path for path in stale if path.exists()]
    planned = {wav_path(SYNTH_DIR, row) for row in rows}
    split_dirs = {SYNTH_DIR / row["split"] for row in rows}
    unplanned = [path for d in split_dirs if d.is_dir() for path in d.glob("*.wav") if path not in planned]
    for path in stale + unplanned:
        path.unlink()
    if stale:
        print(f"{len(stale)} wavs do not match the current plan: they are synthesized again")
    if unplanned:
        print(f"{len(unplanned)} wavs of utterances no longer planned: deleted")


def initialise(conf: dict, synth_dir: Path) -> None:
    global CONF, SYNTH_DIR
    CONF, SYNTH_DIR = conf, synth_dir


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (workers, TTS subprocesses)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(rows: list[dict], nj: int, label: str, every: int) -> dict:
    for split in {row["split"] for row in rows}:
        (SYNTH_DIR / split).mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.time(), cpu_seconds()
    made, seconds = 0, 0.0
    pool = multiprocessing.get_context("fork").Pool(nj, initialise, (CONF, SYNTH_DIR))
    with pool:
        for done, (duration, new) in enumerate(pool.imap_unordered(synthesize_one, rows, chunksize=4), 1):
            made += new
            seconds += duration
            if done % every == 0 or done == len(rows):
                elapsed = time.time() - start
                eta = elapsed / done * (len(rows) - done)
                print(
                    f"[{label}] {done}/{len(rows)} utts ({made} new), {seconds / 60:.1f} min audio, "
                    f"{elapsed:.0f} s elapsed, eta {eta:.0f} s",
                    flush=True,
                )
        pool.close()
        pool.join()
    return {
        "utts": len(rows),
        "new": made,
        "audio_s": round(seconds, 1),
        "wall_s": round(time.time() - start, 1),
        "cpu_s": round(cpu_seconds() - cpu_start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--domains", type=Path, required=True)
    parser.add_argument("--text_dir", type=Path, required=True)
    parser.add_argument("--synth_dir", type=Path, required=True)
    parser.add_argument("--skip_domains", default="", help="space-separated domains not to synthesize")
    parser.add_argument("--nj", type=int, default=os.cpu_count())
    parser.add_argument("--progress_every", type=int, default=100)
    args = parser.parse_args()
    profile = yaml.safe_load(args.profile.read_text())
    conf = yaml.safe_load(args.domains.read_text())
    initialise(conf, args.synth_dir.resolve())

    def sentences(split: str) -> list[str]:
        return (args.text_dir / f"{split}.txt").read_text().splitlines()

    skip = set(args.skip_domains.split())
    babble_rows = plan.babble_plan(sentences(plan.BABBLE), conf["voices"], profile["seed"])
    text_only = set(profile.get("text_only", []))
    splits = [s for s in profile["splits"] if plan.domain_and_role(s)[0] not in skip and s not in text_only]
    repeats = profile.get("voices_per_sentence", {})
    rows = {
        s: plan.split_plan(s, sentences(s), conf, profile["seed"], babble_rows, repeats.get(s, 1))
        for s in splits
    }
    needs_babble = any(row["noise"] for split_rows in rows.values() for row in split_rows)
    every_row = [*babble_rows, *(row for split_rows in rows.values() for row in split_rows)]
    forget_changed(every_row)
    (SYNTH_DIR / "plan").mkdir(parents=True, exist_ok=True)
    for split, split_rows in [(plan.BABBLE, babble_rows), *rows.items()]:
        (SYNTH_DIR / "plan" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))

    report = {}
    if needs_babble:
        report[plan.BABBLE] = run(babble_rows, args.nj, "babble", args.progress_every)
    speech = [row for split_rows in rows.values() for row in split_rows]
    report["speech"] = run(speech, args.nj, "speech", args.progress_every)
    (SYNTH_DIR / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
