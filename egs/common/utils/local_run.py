#!/usr/bin/env python3
"""Run a command, or an array of jobs, on this machine with the calling convention of ESPnet's
``utils/run.pl`` (Kaldi's), for recipes run without an ESPnet checkout (cmd.sh's ``local`` back-end).

    local_run.py [--max-jobs-run N] [--gpu G] [--num_threads T] ... [JOB=a:b] LOG COMMAND...

With ``JOB=a:b`` the command runs once per job index i in a..b (at most N at once; default: all),
``JOB`` replaced by i in LOG and in every argument of COMMAND. Every job's output goes to its log,
between a header (the command, the start time) and a footer (the run time, the exit code). Options
that place a job on a cluster (``--gpu``, ``--num_threads``, ``--mem``, ``--name``, ``--config``,
ESPnet's launcher passes some of them) mean nothing here and are accepted and ignored, as run.pl does.
The exit status is 0 when every job succeeded, else 1 with the failed jobs' logs named.
Only the Python standard library is used: any python3 runs it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

JOB_RANGE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\d+):(\d+)$")
USAGE = "usage: local_run.py [--max-jobs-run N] [--<option> <value> ...] [JOB=a:b] LOG COMMAND..."


@dataclass(frozen=True)
class JobArray:
    """What to run: COMMAND once per index of [first, last], ``variable`` replaced by the index."""

    variable: str | None
    first: int
    last: int
    log: str
    command: list[str]
    max_parallel: int | None

    def job(self, index: int) -> tuple[Path, str]:
        """Job ``index``'s log file and its shell command line."""

        def fill(text: str) -> str:
            return text if self.variable is None else text.replace(self.variable, str(index))

        return Path(fill(self.log)), " ".join(shlex.quote(fill(argument)) for argument in self.command)


def parse(arguments: list[str]) -> JobArray:
    """The job array of a run.pl-style command line; a malformed one exits with the usage."""
    max_parallel = None
    while arguments and arguments[0].startswith("--"):
        if len(arguments) < 2:
            sys.exit(f"local_run.py: option {arguments[0]} has no value\n{USAGE}")
        option, value = arguments[0], arguments[1]
        if option in ("--max-jobs-run", "--max_jobs_run"):
            if not value.isdigit() or int(value) < 1:
                sys.exit(f"local_run.py: {option} is a positive number of jobs, not {value!r}")
            max_parallel = int(value)
        arguments = arguments[2:]
    variable, first, last = None, 1, 1
    if arguments and (match := JOB_RANGE.match(arguments[0])):
        variable, first, last = match[1], int(match[2]), int(match[3])
        if last < first:
            sys.exit(f"local_run.py: empty job range {arguments[0]}: the last index is below the first")
        arguments = arguments[1:]
    elif arguments and "=" in arguments[0] and ":" in arguments[0]:
        sys.exit(f"local_run.py: job range {arguments[0]!r} is not VARIABLE=first:last (e.g. JOB=1:4)")
    if len(arguments) < 2:
        sys.exit(f"local_run.py: a log file and a command are needed\n{USAGE}")
    if variable is not None and variable not in arguments[0]:
        sys.exit(f"local_run.py: the log file {arguments[0]} of an array of jobs must contain {variable}")
    return JobArray(variable, first, last, arguments[0], arguments[1:], max_parallel)


def run_job(log: Path, command: str) -> int:
    """Run one shell command line with its output in ``log``; its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("w", encoding="utf-8") as out:
        out.write(f"# {command}\n# Started at {time.ctime(start)}\n#\n")
        out.flush()
        code = subprocess.call(["bash", "-c", command], stdout=out, stderr=subprocess.STDOUT)
        out.write(f"# Accounting: time={round(time.time() - start)} threads=1\n")
        out.write(
            f"# Ended (code {code}) at {time.ctime()}, elapsed time {round(time.time() - start)} seconds\n"
        )
    return code


def main(arguments: list[str]) -> int:
    jobs = parse(arguments)
    indices = range(jobs.first, jobs.last + 1)
    with ThreadPoolExecutor(max_workers=jobs.max_parallel or len(indices)) as pool:
        codes = list(pool.map(lambda index: run_job(*jobs.job(index)), indices))
    failed = [jobs.job(index)[0] for index, code in zip(indices, codes, strict=True) if code != 0]
    if failed:
        print(
            f"local_run.py: {len(failed)} / {len(codes)} failed, see {' '.join(map(str, failed))}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
