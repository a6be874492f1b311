"""Seconds and peak memory of merging T ESPnet models, streamed against whole models in memory.

    python benchmarks/merge_speed.py                    # OWSM v3.1 base (101M), T = 3 and 8, every method
    python benchmarks/merge_speed.py --quick            # a tiny model, a few seconds (smoke test)
    python benchmarks/merge_speed.py --methods ties tsv_m --models 3

The model is OWSM v3.1 base's architecture (``owsm_shapes.py``: E-Branchformer encoder, 6 blocks
of 384 with 1536 units; Transformer decoder, 6 blocks; 50002 tokens) with random weights, built by
ESPnet itself and saved as an ESPnet model file; T fine-tunes move every floating-point tensor by
1 % of its scale. Each merge runs in a fresh process, which reports its wall time (from opening
the models to the merged file on disk) and its peak resident memory (the kernel's high-water mark
``VmHWM``, reset after the imports, so the peak of the merge itself; it still counts the imports'
resident memory, printed as ``floor``):

    stream     ``ModelMerge(base, files, method).save(out)``: tensor by tensor from the files, the
               merged model written as it is computed
    in-memory  what FusionBench and HF PEFT do: ``torch.load`` every model whole, merge the state
               dicts with the same per-tensor code, ``torch.save`` the result

Targets, checked per row: stream peak RSS at most 2.5x one model file's size (whatever T; the
in-memory baseline grows with T), and stream time at most 1.2x the in-memory time. ``floor``: the
resident memory of the process before any model is opened (Python, torch, ESPnet imports).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from owsm_shapes import build_config
from process_memory import MB, memory_status_mb, reset_peak

RSS_TARGET = 2.5
TIME_TARGET = 1.2


def write_models(work: Path, count: int, quick: bool) -> tuple[Path, list[Path]]:
    """The base model file and ``count`` fine-tunes in ``work`` (kept for later runs)."""
    from espnet_plugins.offline import import_without_downloads

    import_without_downloads("espnet2.text.phoneme_tokenizer")
    from espnet2.tasks.s2t import S2TTask

    base_path = work / "base.pth"
    tuned = [work / f"tuned{t}.pth" for t in range(count)]
    if base_path.is_file() and all(path.is_file() for path in tuned):
        return base_path, tuned
    torch.manual_seed(0)
    model = S2TTask.build_model(argparse.Namespace(**build_config(work, "quick" if quick else "0.1b")))
    state = model.state_dict()
    torch.save(state, base_path)
    values = sum(v.numel() for v in state.values()) / 1e6
    print(f"model: {values:.1f} M values, {base_path.stat().st_size / MB:.0f} MB")
    for t, path in enumerate(tuned):
        generator = torch.Generator().manual_seed(t + 1)
        moved = {}
        for key, value in state.items():
            if value.is_floating_point():
                scale = float(value.float().std()) if value.numel() > 1 else 1.0
                noise = torch.randn(value.shape, generator=generator) * 0.01 * (scale or 1.0)
                moved[key] = value + noise.to(value.dtype)
            else:
                moved[key] = value
        torch.save(moved, path)
    return base_path, tuned


def worker(job: dict[str, Any]) -> dict[str, float]:
    """One merge in this process: {"seconds", "peak_mb", "floor_mb"}: the peak resident memory
    while merging (the kernel's high-water mark, reset after the imports) and the resident memory
    before the first model is opened."""
    from ssvd_peft.merging.engine import ModelMerge

    reset_peak()
    floor = memory_status_mb("VmRSS")
    start = time.perf_counter()
    if job["mode"] == "stream":
        ModelMerge(job["base"], job["models"], job["method"]).save(job["output"])
    else:
        base = torch.load(job["base"], map_location="cpu", weights_only=True)
        models = [torch.load(path, map_location="cpu", weights_only=True) for path in job["models"]]
        torch.save(ModelMerge(base, models, job["method"]).state_dict(), job["output"])
    return {"seconds": time.perf_counter() - start, "peak_mb": memory_status_mb("VmHWM"), "floor_mb": floor}


def run_worker(job: dict[str, Any]) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"merge worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--models", type=int, nargs="+", default=[3, 8], help="values of T")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every merge method")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (medians are reported)")
    parser.add_argument("--work-dir", type=Path, default=Path("exp/merge_speed"), help="model files go here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from ssvd_peft.merging import merge_method_names

    methods = args.methods or merge_method_names()
    work = args.work_dir / ("quick" if args.quick else "owsm_v3.1_base")
    work.mkdir(parents=True, exist_ok=True)
    base, tuned = write_models(work, max(args.models), args.quick)
    size = base.stat().st_size / MB
    print(f"one model file: {size:.0f} MB; targets: stream peak <= {RSS_TARGET} x {size:.0f} MB, "
          f"stream time <= {TIME_TARGET} x in-memory time; median of {args.repeats} run(s)")  # fmt: skip
    header = (
        f"{'method':<15} {'T':>2} {'stream s':>9} {'memory s':>9} {'ratio':>6} {'stream MB':>10} "
        f"{'memory MB':>10} {'x model':>8} {'floor MB':>9}  verdict"
    )
    print(header)
    print("-" * len(header))
    failures = 0
    for count in args.models:
        for method in methods:
            runs: dict[str, list[dict[str, float]]] = {"stream": [], "memory": []}
            for _ in range(args.repeats):
                for mode in ("stream", "memory"):
                    job = {"mode": mode, "base": str(base), "models": [str(p) for p in tuned[:count]]}
                    job.update(method=method, output=str(work / f"merged_{mode}.pth"))
                    runs[mode].append(run_worker(job))
            stream = {key: statistics.median(r[key] for r in runs["stream"]) for key in runs["stream"][0]}
            memory = {key: statistics.median(r[key] for r in runs["memory"]) for key in runs["memory"][0]}
            ratio = stream["seconds"] / memory["seconds"]
            times_model = stream["peak_mb"] / size
            verdicts = [
                "RSS " + ("PASS" if times_model <= RSS_TARGET else "FAIL"),
                "time " + ("PASS" if ratio <= TIME_TARGET else "FAIL"),
            ]
            failures += sum("FAIL" in v for v in verdicts)
            print(
                f"{method:<15} {count:>2} {stream['seconds']:>9.2f} {memory['seconds']:>9.2f} {ratio:>6.2f} "
                f"{stream['peak_mb']:>10.0f} {memory['peak_mb']:>10.0f} {times_model:>8.2f} "
                f"{stream['floor_mb']:>9.0f}  {', '.join(verdicts)}",
                flush=True,
            )
    print(f"{failures} target(s) missed")


if __name__ == "__main__":
    main()
