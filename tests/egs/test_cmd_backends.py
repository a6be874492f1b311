"""cmd.sh's job back-ends (egs/common/cmd_backend.sh) and the local runner that stands in for ESPnet's
run.pl without a checkout (egs/common/utils/local_run.py): Kaldi's calling convention, JOB arrays,
logs and exit codes, and the choice of ESPnet's own scripts when ESPNET_ROOT names a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EGS = Path(__file__).resolve().parents[2] / "egs"
LOCAL_RUN = EGS / "common" / "utils" / "local_run.py"


def local_run(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LOCAL_RUN), *arguments], capture_output=True, text=True, cwd=cwd)


def test_a_job_array_replaces_job_in_the_log_and_the_command(tmp_path: Path) -> None:
    result = local_run(
        "--gpu", "0", "--max-jobs-run", "2", "JOB=2:4", "log/echo.JOB.log", "echo", "job JOB", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    for index in (2, 3, 4):
        lines = (tmp_path / "log" / f"echo.{index}.log").read_text().splitlines()
        assert lines[0] == f"# echo 'job {index}'" and lines[1].startswith("# Started at ")
        assert f"job {index}" in lines and lines[-1].startswith("# Ended (code 0) at ")
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == ["echo.2.log", "echo.3.log", "echo.4.log"]


def test_the_jobs_of_an_array_run_at_once(tmp_path: Path) -> None:
    """Two jobs that each wait for the other's file finish only if they run side by side."""
    wait_for_other = "touch mark.JOB; for i in $(seq 100); do [ $(ls mark.* | wc -l) -eq 2 ] && exit 0; "
    wait_for_other += "sleep 0.1; done; exit 1"
    result = local_run("JOB=1:2", "log.JOB", "bash", "-c", wait_for_other, cwd=tmp_path)
    assert result.returncode == 0, result.stderr + (tmp_path / "log.1").read_text()


def test_a_failed_job_fails_the_call_and_names_its_log(tmp_path: Path) -> None:
    result = local_run("JOB=1:3", "log/j.JOB.log", "bash", "-c", "[ JOB -ne 2 ]", cwd=tmp_path)
    assert result.returncode == 1
    assert f"1 / 3 failed, see {Path('log') / 'j.2.log'}" in result.stderr
    assert (tmp_path / "log" / "j.2.log").read_text().splitlines()[-1].startswith("# Ended (code 1) at ")
    single = local_run("one.log", "false", cwd=tmp_path)
    assert single.returncode == 1 and "1 / 1 failed, see one.log" in single.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["JOB=3:1", "l.JOB", "true"], "empty job range JOB=3:1"),
        (["JOB=a:3", "l.JOB", "true"], "job range 'JOB=a:3' is not VARIABLE=first:last"),
        (["JOB=1:3", "l.log", "true"], "the log file l.log of an array of jobs must contain JOB"),
        (["--max-jobs-run", "0", "l", "true"], "--max-jobs-run is a positive number of jobs, not '0'"),
        (["l.log"], "a log file and a command are needed"),
        (["--gpu"], "option --gpu has no value"),
    ],
)
def test_a_malformed_call_is_refused_with_what_is_wrong(
    arguments: list[str], message: str, tmp_path: Path
) -> None:
    result = local_run(*arguments, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr
    assert not any(tmp_path.iterdir())


def backend(
    tmp_path: Path, cmd_backend: str, espnet_root: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The recipe's path.sh and cmd.sh sourced from egs/myst/asr1 with ``cmd_backend``; prints
    train_cmd, cuda_cmd and decode_cmd, one per line."""
    env = {key: value for key, value in os.environ.items() if key != "ESPNET_ROOT"}
    env.update(cmd_backend=cmd_backend, python=sys.executable, PATH="/usr/bin:/bin")
    if espnet_root is not None:
        env["ESPNET_ROOT"] = str(espnet_root)
    script = '. ./path.sh && . ./cmd.sh && printf "%s\\n" "$train_cmd" "$cuda_cmd" "$decode_cmd"'
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, cwd=EGS / "myst" / "asr1"
    )


def espnet_checkout(root: Path, *scripts: str) -> Path:
    """A directory shaped as an ESPnet checkout's root whose utils/ holds ``scripts``."""
    (root / "utils").mkdir(parents=True)
    for name in scripts:
        (root / "utils" / name).write_text("#!/bin/sh\n")
        (root / "utils" / name).chmod(0o755)
    return root


def test_the_local_backend_runs_jobs_here_without_a_checkout(tmp_path: Path) -> None:
    result = backend(tmp_path, "local")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(LOCAL_RUN)] * 3


def test_a_checkout_gives_espnets_own_scripts(tmp_path: Path) -> None:
    checkout = espnet_checkout(tmp_path / "espnet", "run.pl", "slurm.pl")
    local = backend(tmp_path, "local", checkout)
    assert local.returncode == 0 and local.stdout.splitlines() == ["run.pl"] * 3
    slurm = backend(tmp_path, "slurm", checkout)
    assert slurm.returncode == 0, slurm.stderr
    assert slurm.stdout.splitlines() == [f"slurm.pl --config {EGS / 'common' / 'conf' / 'slurm.conf'}"] * 3


@pytest.mark.parametrize(
    ("cmd_backend", "make_checkout", "message"),
    [
        (
            "slurm",
            False,
            "cmd_backend=slurm runs ESPnet's slurm.pl, which is not on the PATH: set ESPNET_ROOT",
        ),
        ("sge", True, "cmd_backend=sge runs ESPnet's queue.pl, which is not on the PATH"),
        ("pbs", False, "unknown cmd_backend=pbs: local, stdout, slurm or sge"),
    ],
)
def test_a_backend_that_cannot_run_is_refused(
    cmd_backend: str, make_checkout: bool, message: str, tmp_path: Path
) -> None:
    checkout = espnet_checkout(tmp_path / "espnet", "run.pl") if make_checkout else None
    result = backend(tmp_path, cmd_backend, checkout)
    assert result.returncode != 0 and message in result.stderr


def test_an_espnet_root_without_utils_is_refused(tmp_path: Path) -> None:
    result = backend(tmp_path, "local", tmp_path)
    assert result.returncode != 0
    assert f"ESPNET_ROOT={tmp_path} has no utils/: give the root of an ESPnet checkout" in result.stderr
