"""Running egs/synth_domains/asr1/run.sh with the ci profile in a temporary directory (the recipe tests)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

RECIPE = Path(__file__).resolve().parents[2] / "egs" / "synth_domains" / "asr1"
TOOLS = ("flite", "text2wave", "espeak-ng")
ERROR_RATES = ("target WER", "target CER", "source WER", "source CER")
PNG = b"\x89PNG\r\n\x1a\n"


def run_recipe(root: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """run.sh of the ci profile with its data, synth and exp dirs under root."""
    command = ["bash", str(RECIPE / "run.sh"), "--profile", "ci", "--python", sys.executable]
    command += ["--data", str(root / "data"), "--synth", str(root / "synth"), "--exp", str(root / "exp")]
    result = subprocess.run([*command, *options], capture_output=True, text=True)
    assert result.returncode == 0, (
        f"run.sh {' '.join(options)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result


def check_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, f"{missing} not installed: run egs/synth_domains/asr1/local/install_deps.sh"


def refused_stage(root: Path, stage: int) -> subprocess.CompletedProcess[str]:
    """run.sh --stage N --stop_stage N on root's exp and data (for a guard that must refuse)."""
    command = ["bash", str(RECIPE / "run.sh"), "--profile", "ci", "--python", sys.executable]
    command += ["--stage", str(stage), "--stop_stage", str(stage)]
    command += ["--exp", str(root / "exp"), "--data", str(root / "data")]
    return subprocess.run(command, capture_output=True, text=True)


def retrain(run: Path, output_dir: Path) -> None:
    """Train ``run`` again by the command line its log records (ESPnet logs it first), on one thread as
    stage 8 trains it, into ``output_dir``."""
    logged = next(line for line in (run / "finetune.log").read_text().splitlines() if "asr_train" in line)
    command = shlex.split(logged)
    command[command.index("--output_dir") + 1] = str(output_dir)
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]


def assert_reproduced(run: Path, other_seed: Path, tmp_path: Path) -> None:
    """``run`` trained again gives the same tensors bit for bit; its run at another seed differs."""
    retrain(run, tmp_path / "again")
    last = f"{yaml.safe_load((run / 'config.yaml').read_text())['max_epoch']}epoch.pth"

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True)

    original, again = weights(run / last), weights(tmp_path / "again" / last)
    assert original.keys() == again.keys() and original
    assert all(torch.equal(original[key], again[key]) for key in original)
    other = weights(other_seed / last)
    assert any(not torch.equal(original[key], other[key]) for key in original)


def check_numbers(rows: list[dict[str, str]]) -> None:
    """Every error rate of results.csv parses and is at least 0; the base trained nothing, every other
    row trained parameters and has its time and memory."""
    for row in rows:
        adapted = row["method"] != "base"
        for column in ERROR_RATES:
            assert float(row[column]) >= 0.0, (row, column)
        if adapted:
            assert int(row["trainable params"]) > 0, row
            assert float(row["train seconds"]) > 0.0 and float(row["peak memory MB"]) > 0.0, row
        else:
            assert int(row["trainable params"]) == 0, row
            assert row["train seconds"] == row["peak memory MB"] == "", row


def check_forgetting(rows: list[dict[str, str]]) -> None:
    """The forgetting column is the row's source WER minus the base's."""
    base_source_wer = {row["domain"]: float(row["source WER"]) for row in rows if row["method"] == "base"}
    assert len(set(base_source_wer.values())) == 1
    for row in rows:
        change = float(row["source WER"]) - base_source_wer[row["domain"]]
        assert float(row["forgetting (source WER change)"]) == pytest.approx(change, abs=0.011), row
