"""The blind protocol of egs/synth_domains/asr1 (local/freeze.py, finetune_configs.py --tune/--frozen):
rates chosen on dev from the tuning runs, frozen in a dated file, and the guard that refuses a test
decode of a configuration trained at another rate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

RECIPE = Path(__file__).resolve().parents[2] / "egs" / "synth_domains" / "asr1"
sys.path.insert(0, str(RECIPE / "local"))

import freeze  # noqa: E402
from runs import Run  # noqa: E402


def tuning_run(exp: Path, name: str, method: str, rate: str, accuracies: list[float]) -> Run:
    """A finished tuning run: checkpoint.pth with ESPnet's reporter state (valid acc per epoch)."""
    (exp / name).mkdir(parents=True)
    stats = {
        epoch: {"train": {"loss": 1.0}, "valid": {"acc": acc}} for epoch, acc in enumerate(accuracies, 1)
    }
    torch.save({"reporter": {"stats": stats, "epoch": len(accuracies)}}, exp / name / "checkpoint.pth")
    return Run(name, method, freeze.TUNE, rate, f"{name}.yaml", "", "", [name.split("/")[0]])


def test_each_method_gets_the_rate_of_its_best_mean_dev_accuracy(tmp_path: Path) -> None:
    runs = [
        tuning_run(tmp_path, "child/lora@lr0.001", "lora", "0.001", [0.5, 0.7, 0.6]),
        tuning_run(tmp_path, "noisy/lora@lr0.001", "lora", "0.001", [0.4, 0.5]),
        tuning_run(tmp_path, "child/lora@lr0.002", "lora", "0.002", [0.8]),
        tuning_run(tmp_path, "noisy/lora@lr0.002", "lora", "0.002", [0.2]),
        tuning_run(tmp_path, "child/full@lr0.0002", "full", "0.0002", [0.6]),
        tuning_run(tmp_path, "child/full@lr0.0005", "full", "0.0005", [0.6]),
        Run("child/lora", "lora", "main", "-", "lora.yaml", "", "", ["child"]),
    ]
    record = freeze.choose(runs, tmp_path)
    assert record["scores"]["lora"] == {0.001: 0.6, 0.002: 0.5}  # best epochs 0.7 and 0.5; 0.8 and 0.2
    assert record["choices"] == {"lora": 0.001, "full": 0.0002}  # a tie goes to the smaller rate


def test_the_frozen_file_is_dated_and_current_is_its_copy(tmp_path: Path) -> None:
    path = freeze.write_frozen({"scores": {"lora": {0.001: 0.6}}, "choices": {"lora": 0.001}}, tmp_path)
    assert path.read_text() == (tmp_path / freeze.CURRENT).read_text()
    record = yaml.safe_load(path.read_text())
    assert record["made"].startswith(path.stem[:4]) and record["criterion"] == "best valid acc"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, freeze.CURRENT])
    same = freeze.write_frozen({"scores": {"lora": {0.001: 0.6}}, "choices": {"lora": 0.001}}, tmp_path)
    assert same == path and len(list(tmp_path.iterdir())) == 2  # the same choices: no new file


def test_the_guard_checks_the_rate_each_run_trained_at(tmp_path: Path) -> None:
    frozen = freeze.write_frozen({"scores": {}, "choices": {"lora": 0.001, "full": 0.0002}}, tmp_path / "f")
    planned = tmp_path / "lora.yaml"
    planned.write_text(yaml.safe_dump({"optim_conf": {"lr": 0.001}}))
    runs = [
        Run("child/lora", "lora", "main", "-", str(planned), "", "", ["child"]),
        Run("noisy/lora", "lora", "main", "-", str(planned), "", "", ["noisy"]),
        Run("child/lora@lr0.002", "lora", freeze.TUNE, "0.002", str(planned), "", "", ["child"]),
    ]
    for run, rate in zip(runs, (0.001, 0.002, 0.002), strict=True):
        (tmp_path / run.name).mkdir(parents=True)
        (tmp_path / run.name / "config.yaml").write_text(yaml.safe_dump({"optim_conf": {"lr": rate}}))
        (tmp_path / run.name / "train_stats.json").write_text("{}")
    with pytest.raises(SystemExit) as refusal:
        freeze.check_runs(frozen, runs, tmp_path)
    assert str(refusal.value).splitlines()[0].startswith("noisy/lora: ")  # the tuning run is never checked
    assert len(str(refusal.value).splitlines()) == 1
    assert freeze.stale_runs(runs, tmp_path) == ["noisy/lora", "child/lora@lr0.002"]
    freeze.check_runs(frozen, runs[:1], tmp_path)


def test_a_configuration_at_another_rate_is_refused(tmp_path: Path) -> None:
    frozen = freeze.write_frozen({"scores": {}, "choices": {"lora": 0.001}}, tmp_path / "frozen")
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({"optim_conf": {"lr": 0.001}}))
    freeze.check(frozen, "lora", config)
    config.write_text(yaml.safe_dump({"optim_conf": {"lr": 0.002}}))
    with pytest.raises(
        SystemExit, match=r"trains lora at lr 0.002, but the rate frozen on dev for it is 0.001"
    ):
        freeze.check(frozen, "lora", config)
    with pytest.raises(SystemExit, match="has no frozen rate for dora"):
        freeze.check(frozen, "dora", config)
    with pytest.raises(SystemExit, match=r"no frozen learning rates at .* run stage 8 with --tune true"):
        freeze.check(tmp_path / "missing.yaml", "lora", config)


def test_an_unfinished_tuning_run_is_named(tmp_path: Path) -> None:
    (tmp_path / "child" / "lora@lr0.001").mkdir(parents=True)
    run = Run("child/lora@lr0.001", "lora", freeze.TUNE, "0.001", "c.yaml", "", "", ["child"])
    with pytest.raises(SystemExit, match="did not finish"):
        freeze.choose([run], tmp_path)
