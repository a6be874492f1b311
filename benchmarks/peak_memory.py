"""Peak memory and time, or the floating-point work, of one training step of OWSM-shaped models:
full fine-tuning against every PEFT method at the OWSM recipes' budget, with and without ESPnet's
activation checkpointing.

    python benchmarks/peak_memory.py                              # 0.1B and 0.37B
    python benchmarks/peak_memory.py --sizes 1b --checkpointing on --methods full lora ssvd_o
    python benchmarks/peak_memory.py --quick                      # toy size, a smoke test
    python benchmarks/peak_memory.py --sizes 1b --flops-only      # the work of a step only

Models: OWSM v3.1's architectures with random weights (``owsm_shapes.py``): ``0.1b`` (base, 101M),
``0.37b`` (small, 367M), ``1b`` (medium, 1.02B). Every system is built as ``s2t_train`` builds it:
stock ``S2TTask`` for full fine-tuning (the random base loaded), the plugin's ``PeftS2TTask`` with
``--peft_pretrained`` and the recipe's ``egs/common/owsm/conf/peft/<method>.yaml`` block for the
others (LoRA / DoRA / PiSSA r = 32, SSVD / SSVD-O k = 0.4 min(in, out), on every encoder and
decoder linear). Activation checkpointing is ESPnet's own ``gradient_checkpoint_layers`` of the
E-Branchformer encoder (the subsampling and every block) and the Transformer decoder (every block).

A batch is ``--utterances`` utterances of 30 s (OWSM pads every utterance to its 30 s window) with
30 words of text, float32 on the CPU. Each system runs in its own process, with glibc's mmap
threshold fixed at 64 KiB (``ALLOCATOR_ENV``) so that freed tensors leave resident memory: the
model is built, the heap's freed pages go back to the kernel (``malloc_trim``: what loading the
pretrained file and the SVD initialisations left behind is not counted), the kernel's peak-resident
mark (``VmHWM``) is reset, and two AdamW training steps run (forward, backward, optimizer step; the
first allocates the optimizer state). ``model`` is the resident memory of the built model and
optimizer above the floor; ``peak`` is the high-water mark over the two steps less the process's
resident memory before the model was built (Python, torch, ESPnet: the ``floor``), so it counts
what a GPU would hold: weights, gradients, optimizer state, activations (and what the CPU kernels
keep between steps). ``step s`` is the second step's wall time; ``activations`` the bytes autograd
saves for the backward pass in one training forward (``autograd_memory.py``; parameters excluded;
with checkpointing, only what the checkpointed blocks keep at their boundaries).

``--flops-only`` measures instead the floating-point work of one training step, forward and backward
(checkpointed blocks' second forward included), counted by ``torch.utils.flop_counter`` over the
matrix products, convolutions and attention: a GPU's step time is about that work over its
sustained rate.

Target: every PEFT method's peak at most 0.6x full fine-tuning's at 0.37B and above, with the same
checkpointing setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PEFT_CONFIGS = REPO / "egs" / "common" / "owsm" / "conf" / "peft"
METHODS = ["full", "lora", "dora", "pissa", "ssvd", "ssvd_o"]
SECONDS = 30.0
WORDS = 30
MB = 2.0**20
PEAK_TARGET = 0.6
TARGET_SIZES = ("0.37b", "1b")
# Every allocation of 64 KiB or more mapped on its own and unmapped when freed, so that resident
# memory follows the live tensors: glibc's default threshold rises to 32 MiB as blocks are freed,
# and the high-water mark then counts freed activations kept on the heap (0.37B full fine-tuning
# with checkpointing: 11.4 GB against 9.1 GB).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass
class Job:
    """One measurement: a model size, a method, checkpointing on or off."""

    size: str
    method: str
    checkpointing: bool
    utterances: int
    work_dir: str
    flops_only: bool = False


def system_config(config: dict[str, Any], job: Job) -> dict[str, Any]:
    """The training config of ``job``: the OWSM config, checkpointing, the method's peft block."""
    import yaml

    encoder, decoder = dict(config["encoder_conf"]), dict(config["decoder_conf"])
    if job.checkpointing:
        encoder["gradient_checkpoint_layers"] = list(range(encoder["num_blocks"] + 1))
        decoder["gradient_checkpoint_layers"] = list(range(1, decoder["num_blocks"] + 1))
    config = {**config, "encoder_conf": encoder, "decoder_conf": decoder}
    if job.method != "full":
        config.update(yaml.safe_load((PEFT_CONFIGS / f"{job.method}.yaml").read_text()))
    return config


def random_base(config: dict[str, Any], directory: Path) -> Path:
    """The size's model file with random weights (seed 0), written once and reused."""
    import torch
    from espnet2.tasks.s2t import S2TTask

    path = directory / "model.pth"
    if not path.is_file():
        with torch.random.fork_rng():  # the caller's random stream is left as it was
            torch.manual_seed(0)
            model = S2TTask.build_model(argparse.Namespace(**config))
        partial = path.with_suffix(".partial")
        torch.save(model.state_dict(), partial)
        partial.rename(path)
    return path


def build_system(job: Job) -> tuple[Any, list[str]]:
    """(the model of ``job`` in training mode, built as ``s2t_train`` builds it; its token list)."""
    import torch
    from espnet2.tasks.s2t import S2TTask
    from owsm_shapes import build_config

    from espnet_plugins.tasks.s2t import PeftS2TTask

    work = Path(job.work_dir) / job.size
    work.mkdir(parents=True, exist_ok=True)
    base = build_config(work, job.size)
    weights = random_base(base, work)
    config = system_config(base, job)
    if job.method == "full":
        model = S2TTask.build_model(argparse.Namespace(**config))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        model = PeftS2TTask.build_model(argparse.Namespace(**config, peft_pretrained=str(weights)))
    return model.train(), config["token_list"]


def convolution_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    out_shape: Any = None,
) -> int:
    """The work of ``convolution_backward``: each gradient it computes (input, weight) costs what the
    forward convolution costs. torch's own formula counts a grouped convolution's weight gradient
    ``groups`` times over (a depthwise convolution of C channels: C times), which would make the
    E-Branchformer's depthwise convolutions dominate full fine-tuning's count."""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def training_step_flops(model: Any, batch: dict[str, Any]) -> int:
    """Floating-point operations of one forward and backward pass of ``model`` on ``batch`` (the loss
    first of what it returns; matrix products, convolutions, attention; 2 per multiply-add),
    gradients left cleared."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    corrected = {torch.ops.aten.convolution_backward: convolution_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=corrected) as counter:
        loss, *_ = model(**batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def worker(job: Job) -> dict[str, float]:
    """Build the system and run two training steps in this process: {"trainable", "floor_mb",
    "model_mb", "peak_mb", "step_seconds", "activations_mb"} (peak and model above the floor);
    with ``flops_only``, only {"trainable", "tflop"}."""
    import torch
    from autograd_memory import saved_for_backward_bytes
    from owsm_shapes import s2t_batch
    from process_memory import memory_status_mb, release_freed_memory, reset_peak

    from espnet_plugins.offline import import_without_downloads

    import_without_downloads("espnet2.text.phoneme_tokenizer")
    import espnet2.tasks.s2t  # noqa: F401  (imports counted in the floor)

    release_freed_memory()
    floor = memory_status_mb("VmRSS")
    model, token_list = build_system(job)
    batch = s2t_batch(token_list, job.utterances, SECONDS, WORDS, torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if job.flops_only:
        flops = training_step_flops(model, batch)
        return {"trainable": sum(p.numel() for p in trainable), "tflop": flops / 1e12}
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    release_freed_memory()  # what building left behind (the pretrained file, SVD workspaces) is not counted
    model_mb = memory_status_mb("VmRSS") - floor
    reset_peak()
    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = model(**batch)
        loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - start
    peak_mb = memory_status_mb("VmHWM") - floor
    activations = saved_for_backward_bytes(model, **batch)
    return {
        "trainable": sum(p.numel() for p in trainable),
        "floor_mb": floor,
        "model_mb": model_mb,
        "peak_mb": peak_mb,
        "step_seconds": seconds,
        "activations_mb": activations / MB,
    }


def run_worker(job: Job) -> dict[str, float]:
    """``worker(job)`` in a fresh process (so that each peak is its own), with glibc's mmap threshold
    fixed (``ALLOCATOR_ENV``)."""
    command = [sys.executable, __file__, "--worker", json.dumps(job.__dict__)]
    env = {**os.environ, **ALLOCATOR_ENV}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(
            f"peak-memory worker {job} failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(rows: list[tuple[Job, dict[str, float]]]) -> int:
    """Print the table (one row per size, checkpointing and method) and the target checks; the
    number of missed targets."""
    header = (
        f"{'size':<6} {'ckpt':<4} {'method':<7} {'trainable':>13} {'model MB':>9} {'peak MB':>9} "
        f"{'x full':>7} {'activations MB':>15} {'step s':>8} {'x full':>7}"
    )
    print(header)
    print("-" * len(header))
    full = {(job.size, job.checkpointing): result for job, result in rows if job.method == "full"}
    missed = 0
    for job, result in rows:
        reference = full.get((job.size, job.checkpointing))
        peak_ratio = result["peak_mb"] / reference["peak_mb"] if reference else float("nan")
        step_ratio = result["step_seconds"] / reference["step_seconds"] if reference else float("nan")
        checked = reference is not None and job.method != "full" and job.size in TARGET_SIZES
        verdict = ""
        if checked:
            passed = peak_ratio <= PEAK_TARGET
            missed += not passed
            verdict = "  PASS" if passed else "  FAIL"
        setting = "on" if job.checkpointing else "off"
        print(
            f"{job.size:<6} {setting:<4} {job.method:<7} {result['trainable']:>13,} "
            f"{result['model_mb']:>9.0f} {result['peak_mb']:>9.0f} {peak_ratio:>7.2f} "
            f"{result['activations_mb']:>15.0f} "
            f"{result['step_seconds']:>8.2f} {step_ratio:>7.2f}{verdict}"
        )
    floors = sorted(result["floor_mb"] for _, result in rows)
    print(f"floor (imports, not counted): {floors[0]:.0f}-{floors[-1]:.0f} MB")
    print(f"target: PEFT peak <= {PEAK_TARGET} x full fine-tuning's at {' and '.join(TARGET_SIZES)}")
    return missed


def report_flops(rows: list[tuple[Job, dict[str, float]]]) -> None:
    """Print the work of one training step per system, against full fine-tuning's."""
    header = f"{'size':<6} {'ckpt':<4} {'method':<7} {'trainable':>13} {'TFLOP':>8} {'x full':>7}"
    print(header)
    print("-" * len(header))
    full = {(job.size, job.checkpointing): result for job, result in rows if job.method == "full"}
    for job, result in rows:
        reference = full.get((job.size, job.checkpointing))
        ratio = result["tflop"] / reference["tflop"] if reference else float("nan")
        setting = "on" if job.checkpointing else "off"
        print(
            f"{job.size:<6} {setting:<4} {job.method:<7} {result['trainable']:>13,} "
            f"{result['tflop']:>8.3f} {ratio:>7.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=["0.1b", "0.37b", "1b"], default=["0.1b", "0.37b"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--utterances", type=int, default=2, help="utterances of 30 s per batch")
    parser.add_argument("--quick", action="store_true", help="toy model size (smoke test)")
    parser.add_argument("--work-dir", type=Path, default=Path("exp/peak_memory"), help="random base models")
    parser.add_argument(
        "--flops-only", action="store_true", help="count each training step's work; no memory or time"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(Job(**json.loads(args.worker)))))
        return 0
    sizes = ["quick"] if args.quick else args.sizes
    rows = []
    failed = 0
    for size in sizes:
        for checkpointing in args.checkpointing:
            for method in args.methods:
                job = Job(
                    size,
                    method,
                    checkpointing == "on",
                    args.utterances,
                    str(args.work_dir.resolve()),
                    args.flops_only,
                )
                try:
                    rows.append((job, run_worker(job)))
                except RuntimeError as error:  # e.g. killed for want of memory: the other rows still count
                    print(error, file=sys.stderr)
                    failed += 1
    if args.flops_only:
        report_flops(rows)
    else:
        missed = report(rows)
        print(f"{missed} target(s) missed" if missed else "every target met")
    if failed:
        print(f"{failed} system(s) failed (see above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
