"""Data stages of egs/synth_domains/asr1: what the `ci` profile's Kaldi-style data dirs promise.

Stages 1-3 run once per module in a temporary directory (offline TTS, ~20-30 s on 2 cores).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

RECIPE = Path(__file__).resolve().parents[2] / "egs" / "synth_domains" / "asr1"
sys.path.insert(0, str(RECIPE / "local"))

import channel  # noqa: E402
import make_data_dirs  # noqa: E402
import noise  # noqa: E402
import pocketsphinx_check  # noqa: E402
import prepare_text  # noqa: E402
import synthesize  # noqa: E402
import voice_transforms  # noqa: E402

KALDI_FILES = ("wav.scp", "text", "utt2spk", "spk2utt", "utt2domain")
TARGETS = ("accent", "child", "noisy")
OUT_OF_DISTRIBUTION = ("phone",)
TOOLS = ("flite", "text2wave", "espeak-ng")


def run_recipe(root: Path, *options: str, data: Path | None = None) -> None:
    """run.sh of the ci profile with its data, synth and exp dirs under root (data may live elsewhere)."""
    dirs = {"--data": data or root / "data", "--synth": root / "synth", "--exp": root / "exp"}
    command = ["bash", str(RECIPE / "run.sh"), "--profile", "ci", "--python", sys.executable]
    command += [str(part) for pair in dirs.items() for part in pair]
    result = subprocess.run([*command, *options], capture_output=True, text=True)
    assert result.returncode == 0, (
        f"run.sh {' '.join(options)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )


def read_table(path: Path) -> dict[str, str]:
    return {k: v for k, _, v in (line.partition(" ") for line in path.read_text().splitlines())}


@pytest.fixture(scope="module")
def recipe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"{missing} not installed: run egs/synth_domains/asr1/local/install_deps.sh"
    root = tmp_path_factory.mktemp("synth_domains")
    run_recipe(root, "--stage", "1", "--stop_stage", "3")
    return root


@pytest.fixture(scope="module")
def splits(recipe_root: Path) -> dict[str, Path]:
    return {d.name: d for d in sorted((recipe_root / "data").iterdir()) if (d / "wav.scp").exists()}


def speakers(data_dir: Path) -> set[str]:
    return set(read_table(data_dir / "utt2spk").values())


def sentences(data_dir: Path) -> set[str]:
    return set(read_table(data_dir / "text").values())


def test_every_profile_split_has_a_data_dir(splits: dict[str, Path]) -> None:
    expected = {"source_train", "source_dev", "source_test"}
    expected |= {f"{domain}_{role}" for domain in TARGETS for role in ("adapt", "dev", "test")}
    expected |= {f"{domain}_test" for domain in OUT_OF_DISTRIBUTION}
    assert set(splits) == expected


def test_kaldi_files_agree_on_utterances_and_are_sorted(splits: dict[str, Path]) -> None:
    for name, data_dir in splits.items():
        tables = {f: read_table(data_dir / f) for f in KALDI_FILES if f != "spk2utt"}
        utts = list(tables["wav.scp"])
        assert utts == sorted(utts) and utts, name
        for f, table in tables.items():
            assert list(table) == utts, f"{name}/{f}"
        spk2utt = {spk: ids.split() for spk, ids in read_table(data_dir / "spk2utt").items()}
        assert sorted(u for ids in spk2utt.values() for u in ids) == utts
        assert all(tables["utt2spk"][u] == spk for spk, ids in spk2utt.items() for u in ids)
        assert all(u.startswith(tables["utt2spk"][u] + "-") for u in utts), "speaker id prefixes utt id"
        assert set(tables["utt2domain"].values()) == {name.split("_")[0]}
        assert all(tables["text"][u].strip() for u in utts)


def test_wavs_are_16k_mono_speech(splits: dict[str, Path]) -> None:
    for data_dir in splits.values():
        for path in read_table(data_dir / "wav.scp").values():
            audio, rate = sf.read(path, dtype="float32")
            assert rate == 16000 and audio.ndim == 1, path
            assert 0.5 < audio.size / rate < 15.0, path
            assert noise.rms(audio) > 10 ** (-40 / 20), f"{path} is (nearly) silent"


def test_target_adaptation_voices_are_disjoint_from_source_voices(splits: dict[str, Path]) -> None:
    """A test voice may be a source voice: NOISY's rms, heard clean in pretraining, never in adaptation."""
    source = set().union(*(speakers(d) for n, d in splits.items() if n.startswith("source_")))
    for name, data_dir in splits.items():
        if name.split("_")[0] in TARGETS and not name.endswith("_test"):
            assert not speakers(data_dir) & source, name


def test_out_of_distribution_domains_are_tested_only_on_voices_no_adaptation_heard(
    recipe_root: Path, splits: dict[str, Path]
) -> None:
    data = recipe_root / "data"
    assert (data / "ood_domains.txt").read_text().split() == list(OUT_OF_DISTRIBUTION)
    assert (data / "target_domains.txt").read_text().split() == list(TARGETS)
    adaptation = set().union(
        *(speakers(d) for n, d in splits.items() if n.split("_")[0] in TARGETS and not n.endswith("_test"))
    )
    for domain in OUT_OF_DISTRIBUTION:
        assert not any(name.startswith(f"{domain}_") for name in splits if not name.endswith("_test"))
        assert speakers(splits[f"{domain}_test"]) and not speakers(splits[f"{domain}_test"]) & adaptation


def band_energy_db(audio: np.ndarray, rate: int, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    frequencies = np.fft.rfftfreq(audio.size, 1.0 / rate)
    return float(10 * np.log10(spectrum[(frequencies >= low) & (frequencies < high)].sum() + 1e-20))


def test_the_telephone_channel_keeps_the_voice_band_and_removes_the_rest() -> None:
    rate = 16000
    noise_in = np.random.default_rng(0).standard_normal(rate).astype(np.float32) * 0.1
    line = channel.telephone(noise_in, rate)
    assert line.shape == noise_in.shape and line.dtype == np.float32
    assert np.array_equal(line, channel.telephone(noise_in, rate))
    in_band = band_energy_db(line, rate, 500.0, 3000.0) - band_energy_db(noise_in, rate, 500.0, 3000.0)
    above = band_energy_db(line, rate, 4500.0, 8000.0) - band_energy_db(noise_in, rate, 4500.0, 8000.0)
    below = band_energy_db(line, rate, 20.0, 150.0) - band_energy_db(noise_in, rate, 20.0, 150.0)
    assert abs(in_band) < 3.0 and above < -40.0 and below < -10.0, (in_band, above, below)
    with pytest.raises(ValueError, match="band_hz"):
        channel.telephone(noise_in, rate, band_hz=(300.0, 4200.0))


def test_mu_law_keeps_8_bit_codes_with_a_relative_error_under_a_few_percent() -> None:
    levels = np.linspace(-1.0, 1.0, 10001)
    coded = channel.mulaw_roundtrip(levels)
    assert len(np.unique(np.round(coded, 9))) <= 255
    loud = np.abs(levels) > 0.01
    assert np.max(np.abs(coded[loud] - levels[loud]) / np.abs(levels[loud])) < 0.05


def test_phone_speech_is_band_limited(splits: dict[str, Path]) -> None:
    for path in list(read_table(splits["phone_test"] / "wav.scp").values())[:2]:
        audio, rate = sf.read(path, dtype="float32")
        assert band_energy_db(audio, rate, 4500.0, 8000.0) < band_energy_db(audio, rate, 300.0, 3400.0) - 30.0


def identity(voice: str, voices: dict[str, dict]) -> str:
    """The real speaker behind a voice: its transforms' base, followed to an engine voice, without the
    accent (joe.scotland, joe2.scotland and child.joe are all joe)."""
    while "base" in voices[voice]:
        voice = voices[voice]["base"]
    return voice.split(".")[0]


def test_target_tests_hold_out_the_adaptation_voices(splits: dict[str, Path]) -> None:
    """Every target test holds out the adaptation voices; CHILD and NOISY also their identities (no test
    voice is a transform of an adaptation voice). ACCENT is the README's "seen identity": joe2.* is joe."""
    voices = yaml.safe_load((RECIPE / "conf" / "domains.yaml").read_text())["voices"]
    for domain in TARGETS:
        test, adapt = speakers(splits[f"{domain}_test"]), speakers(splits[f"{domain}_adapt"])
        assert not test & adapt, domain
        seen = {identity(v, voices) for v in test} & {identity(v, voices) for v in adapt}
        assert seen == ({"joe"} if domain == "accent" else set()), domain


def test_noisy_test_babble_talkers_are_held_out(recipe_root: Path) -> None:
    def babble_voices(split: str) -> set[str]:
        rows = map(json.loads, (recipe_root / "synth" / "plan" / f"{split}.jsonl").read_text().splitlines())
        return {utt.split("-")[0] for row in rows for utt in row["noise"]["babble"]}

    assert babble_voices("noisy_test") and babble_voices("noisy_adapt")
    assert not babble_voices("noisy_test") & babble_voices("noisy_adapt")


def test_test_text_is_disjoint_from_all_training_text(splits: dict[str, Path]) -> None:
    training = set().union(
        *(sentences(d) for n, d in splits.items() if n == "source_train" or n.endswith(("_adapt", "_dev")))
    )
    for name, data_dir in splits.items():
        if name.endswith("_test"):
            assert not sentences(data_dir) & training, name


def test_child_speech_has_a_child_f0_and_source_speech_does_not(splits: dict[str, Path]) -> None:
    def median_f0(split: str) -> float:
        wavs = read_table(splits[split] / "wav.scp").values()
        return float(np.median([voice_transforms.median_f0(*sf.read(p)) for p in wavs]))

    assert 270.0 <= median_f0("child_test") <= 340.0
    assert 270.0 <= median_f0("child_adapt") <= 340.0
    assert median_f0("source_test") < 250.0


def test_rerunning_synthesis_reuses_every_wav(recipe_root: Path) -> None:
    run_recipe(recipe_root, "--stage", "2", "--stop_stage", "2")
    report = json.loads((recipe_root / "synth" / "report.json").read_text())
    assert report["speech"]["new"] == 0 and report["speech"]["utts"] > 0


def test_synthesis_is_the_same_run_to_run(recipe_root: Path, tmp_path: Path) -> None:
    """Every engine, voice transform and noise draw is seeded per utterance (piper's sampling noise
    too), so a second synthesis in another directory writes the same samples for every wav."""
    run_recipe(tmp_path, "--stage", "1", "--stop_stage", "2")
    first = sorted((recipe_root / "synth").rglob("*.wav"))
    second = sorted((tmp_path / "synth").rglob("*.wav"))
    assert [p.relative_to(recipe_root) for p in first] == [p.relative_to(tmp_path) for p in second]
    assert len(first) > 50
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(sf.read(a)[0], sf.read(b)[0]), a.relative_to(recipe_root)


def test_user_data_dir_adds_a_target_domain(
    recipe_root: Path, splits: dict[str, Path], tmp_path: Path
) -> None:
    user = tmp_path / "dialect"
    for role in ("adapt", "test"):
        (user / role).mkdir(parents=True)
        for f in ("wav.scp", "text", "utt2spk"):
            shutil.copy(splits[f"accent_{role}"] / f, user / role / f)
    data = tmp_path / "data"
    shutil.copytree(recipe_root / "data", data)
    run_recipe(
        recipe_root, "--stage", "3", "--stop_stage", "3", "--target_data_dirs", f"dialect={user}", data=data
    )
    assert (data / "target_domains.txt").read_text().split() == [*TARGETS, "dialect"]
    adapt, dev = read_table(data / "dialect_adapt" / "text"), read_table(data / "dialect_dev" / "text")
    assert adapt and dev and not set(adapt) & set(dev)
    assert set(adapt) | set(dev) == set(read_table(user / "adapt" / "text"))
    assert set(read_table(data / "dialect_test" / "utt2domain").values()) == {"dialect"}


def test_mix_reaches_the_requested_snr() -> None:
    rng = np.random.default_rng(0)
    speech, interference = rng.standard_normal(16000).astype(np.float32), noise.pink_noise(16000, rng)
    mixed = noise.mix(speech, interference, snr_db=5.0)
    assert 20 * np.log10(noise.rms(speech) / noise.rms(mixed - speech)) == pytest.approx(5.0, abs=1e-3)


def test_room_response_has_the_requested_direct_to_reverberant_ratio() -> None:
    response = noise.room_response(16000, rt60_s=0.5, drr_db=6.0, rng=np.random.default_rng(0))
    assert 10 * np.log10(response[0] ** 2 / np.sum(response[1:] ** 2)) == pytest.approx(6.0, abs=1e-3)


def test_pocketsphinx_sample_spreads_evenly_over_the_voices() -> None:
    utts = [f"{voice}-x-{i:02d}" for voice in ("a", "b", "c") for i in range(50)]
    chosen = pocketsphinx_check.sample(utts, 100)
    assert len(set(chosen)) == 100
    assert sorted(Counter(u.split("-")[0] for u in chosen).values()) == [33, 33, 34]
    assert pocketsphinx_check.sample(utts[:7], 100) == utts[:7]


@pytest.mark.slow
def test_pocketsphinx_table_has_a_wer_per_domain(recipe_root: Path) -> None:
    run_recipe(recipe_root, "--stage", "4", "--stop_stage", "4")
    table = (recipe_root / "exp" / "pocketsphinx_wer.md").read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "_test" in line]
    domains = {cells[1].strip(): float(cells[4]) for cells in rows if len(cells) == 5}
    assert set(domains) == {"source", *TARGETS, *OUT_OF_DISTRIBUTION}
    assert domains["child"] > domains["source"] and domains["noisy"] > domains["source"]


def test_fragments_are_the_runs_of_vocabulary_words_cut_into_equal_parts() -> None:
    words = ["the", "cat", "sat", "on", "the", "mat", "with", "a", "very", "old", "hat"]
    runs = list(prepare_text.word_runs(words, {"the", "cat", "sat", "on", "mat", "old", "hat"}))
    assert runs == [["the", "cat", "sat", "on", "the", "mat"], ["old", "hat"]]
    assert prepare_text.fragments(list("abcde"), 3, 10) == [list("abcde")]
    assert prepare_text.fragments(list("abcdefghijkl"), 3, 10) == [list("abcdef"), list("ghijkl")]
    assert prepare_text.fragments(list("abcdefghijk"), 3, 5) == [list("abcd"), list("efgh"), list("ijk")]
    assert prepare_text.fragments(list("ab"), 3, 10) == []


def test_fragment_selection_keeps_only_vocabulary_words_and_more_utterances() -> None:
    pool = [s.split() for s in ["a b c x a b", "a b c d", "c d y z b c d a b c a", "w a b c"]]
    vocab, kept = prepare_text.select(pool, 4, 3, 4, cut_fragments=False)
    assert vocab == ["a", "b", "c", "d"] and kept == ["a b c d"]
    vocab, kept = prepare_text.select(pool, 4, 3, 4, cut_fragments=True)
    assert kept == ["a b c", "a b c d", "b c a", "b c d a"]
    assert all(set(k.split()) <= set(vocab) for k in kept)


def test_synthesis_forgets_wavs_whose_plan_changed_was_never_stored_or_is_gone(tmp_path: Path) -> None:
    def row(utt: str, text: str, babble: list[str] | None = None) -> dict:
        noise = {"kind": "babble", "babble": babble} if babble else None
        return {"utt": utt, "split": "s", "text": text, "noise": noise}

    stored = [
        row("kept", "a b c"),
        row("edited", "a b c"),
        row("talker", "x y z"),
        row("mixed", "m", ["talker"]),
    ]
    (tmp_path / "plan").mkdir()
    (tmp_path / "plan" / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stored))
    (tmp_path / "s").mkdir()
    (tmp_path / "other").mkdir()  # a split this plan does not synthesize: left alone
    (tmp_path / "other" / "x.wav").write_bytes(b"RIFF")
    # "unplanned": left by a larger plan; "dropped": an utterance id the current plan no longer has
    for utt in ("kept", "edited", "talker", "mixed", "unplanned", "dropped"):
        (tmp_path / "s" / f"{utt}.wav").write_bytes(b"RIFF")
    synthesize.initialise({}, tmp_path)
    current = [
        row("kept", "a b c"),
        row("edited", "d e f"),
        row("talker", "x y w"),
        row("mixed", "m", ["talker"]),
        row("unplanned", "g h i"),
    ]
    synthesize.forget_changed(current)
    assert sorted(p.stem for p in (tmp_path / "s").iterdir()) == ["kept"]
    assert (tmp_path / "other" / "x.wav").exists()


def test_rewriting_a_data_dir_drops_the_shapes_and_durations_of_its_old_utterances(tmp_path: Path) -> None:
    def write(utts: list[str], utt2dur: dict | None) -> None:
        table = {u: f"/audio/{u}.wav" for u in utts}
        make_data_dirs.write_data_dir(
            tmp_path, table, dict.fromkeys(utts, "a b"), {u: u.split("-")[0] for u in utts}, "accent", utt2dur
        )

    write(["joe-0", "joe-1"], {"joe-0": "1.0", "joe-1": "2.0"})
    (tmp_path / "speech_shape").write_text("joe-0 16000\njoe-1 32000\n")  # stage 6
    write(["joe-0", "joe-1"], {"joe-0": "1.0", "joe-1": "2.0"})  # same utterances: kept
    assert (tmp_path / "speech_shape").exists()
    write(["joe-0", "joe3-1"], None)  # another voice for the second utterance; durations unknown
    assert not (tmp_path / "speech_shape").exists() and not (tmp_path / "utt2dur").exists()
