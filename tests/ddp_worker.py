"""One rank of the DistributedDataParallel check of every method (run by torch.distributed.run).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py <out_dir>

For every case of ``round_trip_cases``: DDP with its defaults (``find_unused_parameters=False``,
as ESPnet's ``--unused_parameters false``), three Adam steps on this rank's own batches, then the
trainable parameters of every rank must be equal (the gradients were averaged). Writes
``<out_dir>/rank<r>.json``: {case: "ok" or the error}, and the parameters' sum per case.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from round_trip_cases import CASES, adapted_model, inputs, trainable
from torch.nn.parallel import DistributedDataParallel


def run_case(case: str, rank: int) -> tuple[str, float]:
    model = DistributedDataParallel(adapted_model(case).train())
    parameters = trainable(model)
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    for step in range(3):
        x = inputs(seed=100 * rank + step)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if not all(torch.equal(other, flat) for other in gathered):
        return "the ranks' parameters differ after the steps", float(flat.sum())
    return "ok", float(flat.sum())


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results: dict[str, str] = {}
    sums: dict[str, float] = {}
    for case in CASES:
        try:
            results[case], sums[case] = run_case(case, rank)
        except Exception as error:  # recorded per case; the parent test reports it
            results[case] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"results": results, "sums": sums}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
