"""Run a command and record its wall time and peak memory: ``measure.py --out stats.json -- cmd ...``.

Peak memory is the largest resident set size of any process the command ran (``ru_maxrss`` of
the waited-for children, in kB on Linux). The JSON file is written only when the command
succeeds, so its presence marks a finished run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="JSON: seconds, peak_memory_mb")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.perf_counter()
    returncode = subprocess.call(command)
    seconds = time.perf_counter() - start
    if returncode != 0:
        sys.exit(returncode)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    args.out.write_text(
        json.dumps({"seconds": round(seconds, 1), "peak_memory_mb": round(peak_mb, 1)}) + "\n"
    )


if __name__ == "__main__":
    main()
