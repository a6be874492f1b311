"""Load every case's saved adapter into a fresh base model in a new process and save the outputs.

    python tests/fresh_process_loader.py <dir>     # reads <dir>/<case>.pt, writes <dir>/outputs.pt

The random state is moved before every load, so a load that depends on it (a new randomized SVD)
shows as a different output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from round_trip_cases import CASES, RoundTripNet, inputs

from ssvd_peft.checkpoint import load_adapter


def main() -> None:
    directory = Path(sys.argv[1])
    outputs = {}
    for index, case in enumerate(CASES):
        model = RoundTripNet()
        torch.manual_seed(1000 + index)
        load_adapter(model, directory / f"{case}.pt")
        with torch.no_grad():
            outputs[case] = model.eval()(inputs())
    torch.save(outputs, directory / "outputs.pt")


if __name__ == "__main__":
    main()
