"""Stage 1 of egs/myst/asr1 on a miniature fabricated MyST corpus.

The corpus has MyST's layout (data/{train,development,test}/<student>/<session>/<utt>.flac with
<utt>.trn next to each), 16 kHz FLAC audio of random samples and transcripts with MyST's markup.
run.sh runs stage 1 on it as the real recipe does; the data dirs must keep exactly the usable
utterances, normalise their text, and point at audio that ESPnet reads back sample for sample.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from espnet2.fileio.sound_scp import SoundScpReader

SCRIPTS = Path(__file__).resolve().parents[2] / "egs" / "common" / "pyscripts"
RECIPE = Path(__file__).resolve().parents[2] / "egs" / "myst" / "asr1"
FS = 16000
PREFIX = "<eng><asr><notimestamps>"
KALDI_FILES = ("wav.scp", "text", "text.prev", "text.ctc", "utt2spk", "utt2domain", "utt2dur", "speech_shape")

# (partition, student, utterance number, transcript or None for no .trn, seconds, sample rate)
UTTERANCES = [
    ("train", "001001", 1, "the magnet sticks to the iron nail.", 1.0, FS),
    (
        "train",
        "001001",
        2,
        "um (( )) the +mag+ magnet <breath> is wh~ what (*) pulls x-ray's 2 poles",
        1.2,
        FS,
    ),
    ("train", "001001", 3, "((the)) water evaporates <NOISE>", 0.8, FS),
    ("train", "001001", 4, "", 0.5, FS),
    ("train", "001002", 1, "<noise> (( )) <breath> +um", 0.5, FS),
    ("train", "001002", 2, "i think <no_signal> so", 0.5, FS),
    ("train", "001002", 3, "a very long answer about circuits", 30.5, FS),
    ("train", "001002", 4, None, 0.5, FS),
    ("train", "001002", 5, "the bulb lights up", 0.5, 8000),
    ("train", "001002", 6, "Sand and salt, mixed; it's a MIXTURE!", 0.7, FS),
    ("development", "002001", 1, "it floats because of [laugh] buoyancy", 0.6, FS),
    ("test", "003001", 1, "three (*) plus 4 is seven", 0.9, FS),
    ("test", "003002", 1, "the switch is open~ closed", 0.6, FS),
]
KEPT_TRAIN_TEXT = {
    "001001-myst_001001_2014-01-01_10-00-00_ME_1.1_001": "THE MAGNET STICKS TO THE IRON NAIL",
    "001001-myst_001001_2014-01-01_10-00-00_ME_1.1_002": "UM THE MAGNET IS WHAT PULLS X RAY'S TWO POLES",
    "001001-myst_001001_2014-01-01_10-00-00_ME_1.1_003": "WATER EVAPORATES",
    "001002-myst_001002_2014-01-01_10-00-00_ME_1.1_006": "SAND AND SALT MIXED IT'S A MIXTURE",
}
DROPPED_TRAIN = {
    "001001-myst_001001_2014-01-01_10-00-00_ME_1.1_004": "empty",
    "001001-myst_001001_2014-01-01_10-00-00_ME_1.1_005": "unreadable_audio",
    "001002-myst_001002_2014-01-01_10-00-00_ME_1.1_001": "only_markup",
    "001002-myst_001002_2014-01-01_10-00-00_ME_1.1_002": "no_signal",
    "001002-myst_001002_2014-01-01_10-00-00_ME_1.1_003": "too_long",
    "001002-myst_001002_2014-01-01_10-00-00_ME_1.1_005": "not_16k",
}


def session_dir(data: Path, partition: str, student: str) -> Path:
    return data / partition / student / f"myst_{student}_2014-01-01_10-00-00_ME_1.1"


def write_corpus(data: Path) -> dict[str, np.ndarray]:
    """The fabricated corpus under ``data``; the int16 samples of every 16 kHz flac, by utterance id."""
    rng = np.random.default_rng(0)
    audio: dict[str, np.ndarray] = {}
    for partition, student, number, transcript, seconds, rate in UTTERANCES:
        folder = session_dir(data, partition, student)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{folder.name}_{number:03d}"
        samples = rng.integers(-8000, 8000, size=int(seconds * rate), dtype=np.int16)
        soundfile.write(folder / f"{stem}.flac", samples, rate, subtype="PCM_16")
        audio[f"{student}-{stem}"] = samples
        if transcript is not None:
            (folder / f"{stem}.trn").write_text(transcript + "\n")
    broken = session_dir(data, "train", "001001") / "myst_001001_2014-01-01_10-00-00_ME_1.1_005"
    Path(f"{broken}.flac").write_bytes(b"not a flac file")
    Path(f"{broken}.trn").write_text("the needle points north\n")
    return audio


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """``command``'s result, the shared scripts importable as the recipe's path.sh makes them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, capture_output=True, text=True, env=env)


def read_table(path: Path) -> dict[str, str]:
    rows = (line.split(" ", 1) for line in path.read_text().splitlines())
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """(data dir written by run.sh stage 1, the corpus audio by utterance id)."""
    root = tmp_path_factory.mktemp("myst")
    audio = write_corpus(root / "corpus" / "data")
    command = [str(RECIPE / "run.sh"), "--stage", "1", "--stop_stage", "1", "--python", sys.executable]
    command += ["--corpus_dir", str(root / "corpus"), "--data", str(root / "data")]
    result = run(command)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train: 4 utterances" in result.stdout
    assert "1 flac files without a transcript" in result.stdout
    return root / "data", audio


def test_train_keeps_exactly_the_usable_utterances_with_normalised_text(prepared) -> None:
    data, _ = prepared
    assert read_table(data / "train" / "text.ctc") == KEPT_TRAIN_TEXT
    assert read_table(data / "train" / "text") == {u: f"{PREFIX} {t}" for u, t in KEPT_TRAIN_TEXT.items()}
    assert read_table(data / "train" / "text.prev") == dict.fromkeys(KEPT_TRAIN_TEXT, "<na>")
    assert read_table(data / "train" / "utt2domain") == dict.fromkeys(KEPT_TRAIN_TEXT, "child")


def test_every_dropped_utterance_is_listed_with_its_reason(prepared) -> None:
    data, _ = prepared
    assert read_table(data / "local" / "dropped_train.txt") == DROPPED_TRAIN
    assert read_table(data / "local" / "dropped_test.txt") == {}


def test_dev_and_test_come_from_their_partitions_with_disjoint_speakers(prepared) -> None:
    data, _ = prepared
    assert read_table(data / "dev" / "text.ctc") == {
        "002001-myst_002001_2014-01-01_10-00-00_ME_1.1_001": "IT FLOATS BECAUSE OF BUOYANCY"
    }
    assert read_table(data / "test" / "text.ctc") == {
        "003001-myst_003001_2014-01-01_10-00-00_ME_1.1_001": "THREE PLUS FOUR IS SEVEN",
        "003002-myst_003002_2014-01-01_10-00-00_ME_1.1_001": "THE SWITCH IS CLOSED",
    }
    speakers = {
        split: set(read_table(data / split / "utt2spk").values()) for split in ("train", "dev", "test")
    }
    assert speakers == {"train": {"001001", "001002"}, "dev": {"002001"}, "test": {"003001", "003002"}}


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_files_are_sorted_and_spk2utt_agrees_with_utt2spk(prepared, split: str) -> None:
    data, _ = prepared
    folder = data / split
    keys = None
    for name in (*KALDI_FILES, "spk2utt"):
        lines = (folder / name).read_text().splitlines()
        assert lines == sorted(lines), f"{split}/{name} is not sorted"
        if name != "spk2utt":
            assert keys is None or [line.split()[0] for line in lines] == keys, f"{split}/{name} keys differ"
            keys = [line.split()[0] for line in lines]
    utt2spk = read_table(folder / "utt2spk")
    assert all(utt.startswith(f"{spk}-") for utt, spk in utt2spk.items())
    spk2utt = {spk: utts.split() for spk, utts in read_table(folder / "spk2utt").items()}
    assert spk2utt == {
        spk: [u for u in utt2spk if utt2spk[u] == spk] for spk in sorted(set(utt2spk.values()))
    }


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_wav_scp_reads_back_the_corpus_samples_through_espnet(prepared, split: str) -> None:
    data, audio = prepared
    reader = SoundScpReader(str(data / split / "wav.scp"), dtype="int16")
    shapes = read_table(data / split / "speech_shape")
    durations = read_table(data / split / "utt2dur")
    assert len(reader) == len(shapes) > 0
    for utt in reader:
        rate, samples = reader[utt]
        assert rate == FS
        np.testing.assert_array_equal(samples, audio[utt])
        assert int(shapes[utt]) == len(samples)
        assert float(durations[utt]) == pytest.approx(len(samples) / FS, abs=1e-3)


def test_the_ldc_release_layout_is_found_too(tmp_path: Path) -> None:
    data = tmp_path / "LDC2021S05" / "myst_child_conv_speech" / "data"
    for partition, student in (("train", "001001"), ("development", "002001"), ("test", "003001")):
        folder = session_dir(data, partition, student)
        folder.mkdir(parents=True)
        soundfile.write(folder / f"{folder.name}_001.flac", np.zeros(800, dtype=np.int16), FS)
        (folder / f"{folder.name}_001.trn").write_text("yes\n")
    result = run([sys.executable, str(RECIPE / "local" / "data_prep.py"), "--corpus_dir",
                  str(tmp_path / "LDC2021S05"), "--data_dir", str(tmp_path / "out")])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_table(tmp_path / "out" / "test" / "text.ctc") == {
        "003001-myst_003001_2014-01-01_10-00-00_ME_1.1_001": "YES"
    }


def test_a_missing_corpus_path_says_what_was_expected(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run([sys.executable, str(RECIPE / "local" / "data_prep.py"), "--corpus_dir", str(missing),
                  "--data_dir", str(tmp_path / "out")])  # fmt: skip
    assert result.returncode == 1
    assert f"--corpus_dir {missing} does not exist" in result.stderr
    assert "data/{train,development,test}/<student_id>/<session_id>/<utt>.flac" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_directory_that_is_not_myst_is_refused_with_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "corpus" / "ABA" / "wav").mkdir(parents=True)
    (tmp_path / "corpus" / "data" / "train").mkdir(parents=True)
    result = run([sys.executable, str(RECIPE / "local" / "data_prep.py"), "--corpus_dir",
                  str(tmp_path / "corpus"), "--data_dir", str(tmp_path / "out")])  # fmt: skip
    assert result.returncode == 1
    assert "is not the MyST corpus (it holds ['ABA', 'data'])" in result.stderr
    assert "<utt>.trn next to each flac" in result.stderr


def test_run_sh_refuses_unknown_options_and_a_missing_corpus_dir(tmp_path: Path) -> None:
    unknown = run([str(RECIPE / "run.sh"), "--corpus", str(tmp_path)])
    assert unknown.returncode == 1
    assert "unknown option or missing value: --corpus" in unknown.stderr
    assert "usage:" in unknown.stderr
    no_corpus = run([str(RECIPE / "run.sh"), "--stop_stage", "1", "--data", str(tmp_path / "data")])
    assert no_corpus.returncode == 1
    assert "set it in the recipe's db.sh or pass --corpus_dir" in no_corpus.stderr


def test_espnets_test_filter_list_selects_its_utterances_of_test(prepared, tmp_path: Path) -> None:
    """``--test_filter_list`` (ESPnet's conf/file_list/test.list names utterances by file stem)."""
    data, _ = prepared
    kept_name = "myst_003001_2014-01-01_10-00-00_ME_1.1_001"
    listed = tmp_path / "test.list"
    listed.write_text(f"{kept_name}\nmyst_009999_2014-01-01_10-00-00_ME_1.1_007\n")
    corpus = data.parent / "corpus"
    out = tmp_path / "data"
    result = run([sys.executable, str(RECIPE / "local" / "data_prep.py"), "--corpus_dir", str(corpus),
                  "--data_dir", str(out), "--test_filter_list", str(listed)])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test_filter: 1 utterances of the 2 listed (1 not in test" in result.stdout
    test = read_table(out / "test" / "text.ctc")
    assert len(test) == 2
    kept_utt = f"003001-{kept_name}"
    assert read_table(out / "test_filter" / "text.ctc") == {kept_utt: test[kept_utt]}
    assert read_table(out / "test_filter" / "wav.scp") == {
        utt: path for utt, path in read_table(out / "test" / "wav.scp").items() if utt.endswith(kept_name)
    }
    missing = (out / "local" / "test_filter_missing.txt").read_text()
    assert missing == "myst_009999_2014-01-01_10-00-00_ME_1.1_007\n"


def test_a_missing_test_filter_list_is_named_before_anything_is_written(prepared, tmp_path: Path) -> None:
    data, _ = prepared
    result = run([sys.executable, str(RECIPE / "local" / "data_prep.py"), "--corpus_dir",
                  str(data.parent / "corpus"), "--data_dir", str(tmp_path / "out"), "--test_filter_list",
                  str(tmp_path / "test.list")])  # fmt: skip
    assert result.returncode == 1
    assert f"--test_filter_list {tmp_path / 'test.list'} does not exist" in result.stderr
    assert "egs2/myst/asr1/conf/file_list/test.list" in result.stderr
    assert not (tmp_path / "out").exists()


def test_student_grades_give_every_set_and_test_filter_utt2grade(prepared, tmp_path: Path) -> None:
    data, _ = prepared
    grades = tmp_path / "grades.txt"
    grades.write_text("001001 3\n001002 4\n\n002001 5\n003001 3\n003002 5\n009999 4\n")
    listed = tmp_path / "test.list"
    listed.write_text("myst_003002_2014-01-01_10-00-00_ME_1.1_001\n")
    out = tmp_path / "data"
    result = run([sys.executable, str(RECIPE / "local" / "data_prep.py"), "--corpus_dir",
                  str(data.parent / "corpus"), "--data_dir", str(out), "--student_grades", str(grades),
                  "--test_filter_list", str(listed)])  # fmt: skip
    assert result.returncode == 0, result.stderr
    for split in ("train", "dev", "test", "test_filter"):
        utt2grade = read_table(out / split / "utt2grade")
        assert list(utt2grade) == list(read_table(out / split / "utt2spk"))  # every utterance, same order
        expected = {"001001": "3", "001002": "4", "002001": "5", "003001": "3", "003002": "5"}
        assert all(grade == expected[utt.split("-")[0]] for utt, grade in utt2grade.items())
    assert set(read_table(out / "test" / "utt2grade").values()) == {"3", "5"}
    assert set(read_table(out / "test_filter" / "utt2grade").values()) == {"5"}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            "001001 3\n001002 4\n002001 5\n",
            "--student_grades lists no grade for 2 students of test: 003001 003002",
        ),
        ("001001 3 extra\n", "grades.txt:1: '001001 3 extra' is not '<student_id> <grade>'"),
    ],
)
def test_student_grades_that_miss_a_student_stop_stage_1_before_anything_is_written(
    prepared, tmp_path: Path, lines: str, message: str
) -> None:
    data, _ = prepared
    grades = tmp_path / "grades.txt"
    grades.write_text(lines)
    result = run([sys.executable, str(RECIPE / "local" / "data_prep.py"), "--corpus_dir",
                  str(data.parent / "corpus"), "--data_dir", str(tmp_path / "out"), "--student_grades",
                  str(grades)])  # fmt: skip
    assert result.returncode == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()
