"""Stage 1 of egs/l2arctic/asr1 on a miniature fabricated L2-ARCTIC corpus.

Every one of the 24 speakers gets <SPEAKER>/wav/arctic_a000N.wav (a tone at 44.1 kHz, as
L2-ARCTIC records; one speaker at 16 kHz) and <SPEAKER>/transcript/arctic_a000N.txt (prompt text
with punctuation, numbers, one missing and one empty). run.sh runs stage 1 as the real recipe
does; the splits must be speaker-disjoint and balanced over first languages, and wav.scp must
point at 16 kHz audio that is the resampled recording.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
from espnet2.fileio.sound_scp import SoundScpReader
from scipy.signal import resample_poly

SCRIPTS = Path(__file__).resolve().parents[2] / "egs" / "common" / "pyscripts"
RECIPE = Path(__file__).resolve().parents[2] / "egs" / "l2arctic" / "asr1"
FS = 16000
SOURCE_FS = 44100
PREFIX = "<eng><asr><notimestamps>"
L1 = {
    "arabic": ("ABA", "SKA", "YBAA", "ZHAA"), "mandarin": ("BWC", "LXC", "NCC", "TXHC"),
    "hindi": ("ASI", "RRBI", "SVBI", "TNI"), "korean": ("HJK", "HKK", "YDCK", "YKWK"),
    "spanish": ("EBVS", "ERMS", "MBMPS", "NJS"), "vietnamese": ("HQTV", "PNV", "THV", "TLV"),
}  # fmt: skip
SPEAKER_L1 = {speaker: l1 for l1, speakers in L1.items() for speaker in speakers}
PROMPTS = {
    "arctic_a0001": "Author of the danger trail, Philip Steels, etc.",
    "arctic_a0002": "It's 1908 -- the twenty-first century!",
    "arctic_b0001": "Will we ever forget it.",
    "arctic_b0300": "He was bent on a very important errand.",
}
EXPECTED_TEXT = {
    "arctic_a0001": "AUTHOR OF THE DANGER TRAIL PHILIP STEELS ETC",
    "arctic_a0002": "IT'S ONE THOUSAND NINE HUNDRED EIGHT THE TWENTY FIRST CENTURY",
    "arctic_b0001": "WILL WE EVER FORGET IT",
    "arctic_b0300": "HE WAS BENT ON A VERY IMPORTANT ERRAND",
}
SPLIT_PROMPTS = {
    "adapt": ("arctic_a0001", "arctic_a0002"),
    "dev": ("arctic_b0001",),
    "test": ("arctic_b0300",),
}
NATIVE_16K = "NJS"
SECONDS = 0.25


def frequency(speaker: str, utt: str) -> float:
    return 200.0 + 25 * sorted(SPEAKER_L1).index(speaker) + 60 * list(PROMPTS).index(utt)


def tone(speaker: str, utt: str, rate: int) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * frequency(speaker, utt) * np.arange(int(SECONDS * rate)) / rate)


def write_corpus(root: Path, speakers: list[str]) -> None:
    for speaker in speakers:
        (root / speaker / "wav").mkdir(parents=True)
        (root / speaker / "transcript").mkdir(parents=True)
        rate = FS if speaker == NATIVE_16K else SOURCE_FS
        for utt, prompt in PROMPTS.items():
            soundfile.write(
                root / speaker / "wav" / f"{utt}.wav", tone(speaker, utt, rate), rate, subtype="PCM_16"
            )
            (root / speaker / "transcript" / f"{utt}.txt").write_text(prompt)
    (root / "ABA" / "transcript" / "arctic_a0002.txt").unlink()
    (root / "SKA" / "transcript" / "arctic_a0002.txt").write_text(" -- . \n")


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """``command``'s result, the shared scripts importable as the recipe's path.sh makes them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, capture_output=True, text=True, env=env)


def data_prep(corpus: Path, data: Path, audio: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(RECIPE / "local" / "data_prep.py"), "--corpus_dir", str(corpus),
                "--data_dir", str(data), "--audio_dir", str(audio)])  # fmt: skip


def read_table(path: Path) -> dict[str, str]:
    rows = (line.split(" ", 1) for line in path.read_text().splitlines())
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recipe-like root: corpus/, data/ and audio/ after run.sh stage 1."""
    root = tmp_path_factory.mktemp("l2arctic")
    write_corpus(root / "corpus", list(SPEAKER_L1))
    command = [str(RECIPE / "run.sh"), "--stage", "1", "--stop_stage", "1", "--python", sys.executable]
    command += ["--corpus_dir", str(root / "corpus"), "--data", str(root / "data")]
    command += ["--local_data_opts", f"--audio_dir {root / 'audio'} --nj 2"]
    result = run(command)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "adapt: 22 utterances" in result.stdout
    return root


def speakers_of(data: Path, split: str) -> set[str]:
    return set(read_table(data / split / "utt2spk").values())


def test_splits_are_speaker_disjoint_and_balanced_over_first_languages(prepared: Path) -> None:
    data = prepared / "data"
    splits = {split: speakers_of(data, split) for split in ("adapt", "dev", "test")}
    assert splits["adapt"].isdisjoint(splits["dev"]) and splits["adapt"].isdisjoint(splits["test"])
    assert splits["dev"].isdisjoint(splits["test"])
    assert splits["adapt"] | splits["dev"] | splits["test"] == set(SPEAKER_L1)
    per_l1 = {split: Counter(SPEAKER_L1[s] for s in speakers) for split, speakers in splits.items()}
    assert per_l1 == {
        "adapt": Counter(dict.fromkeys(L1, 2)),
        "dev": Counter(list(L1)),
        "test": Counter(list(L1)),
    }
    assert splits["test"] == {"ZHAA", "TXHC", "TNI", "YKWK", "NJS", "TLV"}


def test_text_is_normalised_with_the_owsm_prefix_and_the_l1_as_domain(prepared: Path) -> None:
    data = prepared / "data"
    for split in ("adapt", "dev", "test"):
        texts = read_table(data / split / "text.ctc")
        speakers = speakers_of(data, split)
        expected = {
            f"{s}-{utt}": text
            for s in sorted(speakers)
            for utt, text in EXPECTED_TEXT.items()
            if utt in SPLIT_PROMPTS[split]
            and (s, utt) not in {("ABA", "arctic_a0002"), ("SKA", "arctic_a0002")}
        }
        assert texts == expected
        assert read_table(data / split / "text") == {u: f"{PREFIX} {t}" for u, t in expected.items()}
        assert read_table(data / split / "text.prev") == dict.fromkeys(expected, "<na>")
        assert read_table(data / split / "utt2domain") == {u: SPEAKER_L1[u.split("-")[0]] for u in expected}


def test_adaptation_dev_and_test_prompts_are_disjoint(prepared: Path) -> None:
    data = prepared / "data"
    texts = {split: set(read_table(data / split / "text.ctc").values()) for split in SPLIT_PROMPTS}
    assert all(texts.values())
    assert texts["adapt"].isdisjoint(texts["dev"] | texts["test"])
    assert texts["dev"].isdisjoint(texts["test"])


def test_missing_empty_and_other_split_utterances_are_dropped_with_their_reason(prepared: Path) -> None:
    def other_split_prompts(split: str) -> dict[str, str]:
        others = [utt for utt in PROMPTS if utt not in SPLIT_PROMPTS[split]]
        speakers = speakers_of(prepared / "data", split)
        return {f"{s}-{utt}": "other_split_prompt" for s in speakers for utt in others}

    assert read_table(prepared / "data" / "local" / "dropped_adapt.txt") == {
        "ABA-arctic_a0002": "no_transcript",
        "SKA-arctic_a0002": "empty",
        **other_split_prompts("adapt"),
    }
    for split in ("dev", "test"):
        assert read_table(prepared / "data" / "local" / f"dropped_{split}.txt") == other_split_prompts(split)


@pytest.mark.parametrize("split", ["adapt", "dev", "test"])
def test_files_are_sorted_and_spk2utt_agrees_with_utt2spk(prepared: Path, split: str) -> None:
    folder = prepared / "data" / split
    keys = None
    for name in (
        "wav.scp",
        "text",
        "text.prev",
        "text.ctc",
        "utt2spk",
        "utt2domain",
        "utt2dur",
        "speech_shape",
    ):
        lines = (folder / name).read_text().splitlines()
        assert lines == sorted(lines), f"{split}/{name} is not sorted"
        assert keys is None or [line.split()[0] for line in lines] == keys, f"{split}/{name} keys differ"
        keys = [line.split()[0] for line in lines]
    utt2spk = read_table(folder / "utt2spk")
    spk2utt = {spk: utts.split() for spk, utts in read_table(folder / "spk2utt").items()}
    assert list(spk2utt) == sorted(spk2utt)
    assert spk2utt == {
        spk: [u for u in utt2spk if utt2spk[u] == spk] for spk in sorted(set(utt2spk.values()))
    }


@pytest.mark.parametrize("split", ["adapt", "dev", "test"])
def test_wav_scp_reads_back_the_recording_at_16_khz_through_espnet(prepared: Path, split: str) -> None:
    folder = prepared / "data" / split
    reader = SoundScpReader(str(folder / "wav.scp"), dtype="float32")
    shapes = read_table(folder / "speech_shape")
    for utt in reader:
        speaker, stem = utt.split("-")
        rate, samples = reader[utt]
        assert rate == FS and int(shapes[utt]) == len(samples)
        source = prepared / "corpus" / speaker / "wav" / f"{stem}.wav"
        original, _ = soundfile.read(source, dtype="float32")
        if speaker == NATIVE_16K:
            assert read_table(folder / "wav.scp")[utt] == str(source.resolve())
            np.testing.assert_array_equal(samples, original)
            continue
        assert read_table(folder / "wav.scp")[utt] == str(
            (prepared / "audio" / speaker / f"{stem}.flac").resolve()
        )
        np.testing.assert_allclose(samples, resample_poly(original, 160, 441), atol=1.5 / 32768)
        inner = slice(64, -64)
        np.testing.assert_allclose(samples[inner], tone(speaker, stem, FS)[inner], atol=5e-3)


def test_a_second_run_keeps_the_resampled_copies(prepared: Path, tmp_path: Path) -> None:
    copies = sorted((prepared / "audio").rglob("*.flac"))
    assert len(copies) == 12 * 2 - 2 + 6 + 5  # only kept utterances; NJS (test) is at 16 kHz already
    before = {path: path.stat().st_mtime_ns for path in copies}
    result = data_prep(prepared / "corpus", tmp_path / "data", prepared / "audio")
    assert result.returncode == 0, result.stderr
    assert {path: path.stat().st_mtime_ns for path in copies} == before
    assert (tmp_path / "data" / "test" / "wav.scp").read_text() == (
        prepared / "data" / "test" / "wav.scp"
    ).read_text()


def test_a_missing_corpus_path_says_what_was_expected(tmp_path: Path) -> None:
    result = data_prep(tmp_path / "nowhere", tmp_path / "data", tmp_path / "audio")
    assert result.returncode == 1
    assert f"--corpus_dir {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert "<SPEAKER>/wav/arctic_a0001.wav" in result.stderr and "<SPEAKER>/transcript/" in result.stderr
    assert not (tmp_path / "data").exists()


def test_a_corpus_with_a_speaker_still_zipped_names_it(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus", [s for s in SPEAKER_L1 if s != "TLV"])
    (tmp_path / "corpus" / "TLV.zip").write_bytes(b"PK")
    result = data_prep(tmp_path / "corpus", tmp_path / "data", tmp_path / "audio")
    assert result.returncode == 1
    assert "no wav/ folder for speakers TLV; unzip TLV.zip in" in result.stderr
    assert not (tmp_path / "audio").exists()
