"""Running ESPnet entry points in a subprocess, as a recipe would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "conf" / "tiny" / "asr_transformer.yaml"


def run_module(module: str, args: list[str], cwd: Path, log: Path, expect_failure: bool = False) -> str:
    """``python -m module args`` in ``cwd`` with stdout+stderr in ``log``; the log text on success
    (with ``expect_failure``: the log text of a run that failed, and a test failure if it did not)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with log.open("w") as out:
        result = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    text = log.read_text()
    if expect_failure:
        if result.returncode == 0:
            pytest.fail(f"python -m {module} succeeded where it should have failed; see {log}")
        return text
    if result.returncode != 0:
        pytest.fail(f"python -m {module} failed ({result.returncode}); last lines of {log}:\n{text[-3000:]}")
    return text


def data_args(prefix: str, data_dir: Path) -> list[str]:
    """ESPnet's --{prefix}_data_path_and_name_and_type pair (speech, text) and shape file."""
    return [
        f"--{prefix}_data_path_and_name_and_type",
        f"{data_dir}/wav.scp,speech,sound",
        f"--{prefix}_data_path_and_name_and_type",
        f"{data_dir}/text,text,text",
        f"--{prefix}_shape_file",
        f"{data_dir}/speech_shape",
    ]


def read_text_file(path: Path) -> dict[str, str]:
    """A Kaldi-style ``utt text`` file as a dict (empty text for a line with the key only)."""
    rows = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


def pretrain_base(work: Path, epochs: int) -> Path:
    """Train the tiny base model with stock ``espnet2.bin.asr_train`` on ``work``/data/{train,valid};
    its best model file (config.yaml next to it)."""
    args = ["--config", str(TINY_CONFIG), "--token_list", "data/tokens.txt", "--output_dir", "exp/base"]
    args += ["--max_epoch", str(epochs)]
    args += data_args("train", work / "data" / "train") + data_args("valid", work / "data" / "valid")
    run_module("espnet2.bin.asr_train", args, work, work / "pretrain.log")
    return work / "exp" / "base" / "valid.acc.best.pth"


def export_merged(work: Path, exp: Path, output_dir: str, *extra: str) -> Path:
    """Run ``espnet_plugins.bin.export_merged`` on the best model of ``exp``; the export directory."""
    args = [
        "--asr_train_config",
        str(exp / "config.yaml"),
        "--asr_model_file",
        str(exp / "valid.acc.best.pth"),
    ]
    args += ["--output_dir", output_dir, *extra]
    run_module("espnet_plugins.bin.export_merged", args, work, work / f"{output_dir}.log")
    return work / output_dir


DECODING = ["--batch_size", "1", "--beam_size", "2", "--ctc_weight", "0.5", "--ngpu", "0"]


def decode(
    work: Path, module: str, config: Path, model: Path, name: str, data: Path, *extra: str
) -> dict[str, str]:
    """Hypotheses of ``module`` (an inference entry point) for the utterances of the data dir ``data``."""
    args = [
        "--asr_train_config",
        str(config),
        "--asr_model_file",
        str(model),
        "--output_dir",
        f"decode/{name}",
    ]
    args += ["--data_path_and_name_and_type", f"{data}/wav.scp,speech,sound", *DECODING, *extra]
    run_module(module, args, work, work / f"decode_{name}.log")
    return read_text_file(work / "decode" / name / "1best_recog" / "text")
