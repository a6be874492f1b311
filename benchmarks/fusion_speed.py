"""Training step time and activation memory of feature fusion against LoRA and full fine-tuning, and
an epoch with a warm tap cache against one that computes the taps.

    python benchmarks/fusion_speed.py                 # the recipe's Conformer and OWSM v3.1 base
    python benchmarks/fusion_speed.py --models recipe
    python benchmarks/fusion_speed.py --quick         # toy sizes, a smoke test

Every system is built by the plugin's task from its training-config blocks, as ``asr_train`` /
``s2t_train`` build it (pretrained weights loaded, adapters injected, encoder fused):

    full        every parameter trained
    lora        LoRA rank 8 on linear_q/k/v/out, w_1, w_2 of encoder and decoder (the recipe's budget)
    f0, f1, f2  fusion alone over every tap: weighted_sum, grouped (3 groups), ladder (width D / 8,
                2 heads); the decoder and CTC head trained in full
    f1+lora     grouped fusion with LoRA rank 8 in the encoder's blocks
    f1+dec      grouped fusion, the decoder adapted by LoRA rank 8 instead of trained in full (only the
                CTC head in full): fusion at an adapter's budget

Models: ``recipe``, the offline recipe's base (``egs/synth_domains/asr1/pretrained/full``: Conformer,
6 blocks of 144, 300 tokens; its trained weights), batches of 8 utterances of 3 s; ``owsm``, OWSM
v3.1 base's architecture with random weights (``owsm_shapes.py``, 101M), batches of 4 of 8 s.
SpecAugment is off in every system (the tap cache needs the same features every epoch).

Per system: the median seconds of a training step (forward, backward, Adam step) after one warm-up
step, in one process, one system after the other; the activation memory, the bytes autograd saves
for the backward pass in one training forward (distinct storages, parameters excluded); trainable
parameters, in all and in the encoder (for fusion: the head and the adapters). The cache rows time
an epoch of ``--batches`` batches of f1: without a cache, then with a cache filled by a first epoch.

Targets: f0, f1 and f2 at most 0.5x LoRA's step time and 0.5x its activation memory; f1+lora at most
0.65x full fine-tuning's step time with at least 90 % fewer trainable encoder parameters; an epoch
with a warm cache at most 0.3x an uncached one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from autograd_memory import saved_for_backward_bytes
from owsm_shapes import build_config, s2t_batch

REPO = Path(__file__).resolve().parents[1]
RECIPE_BASE = REPO / "egs" / "synth_domains" / "asr1" / "pretrained" / "full"
MB = 2.0**20
TARGETS = ["linear_q", "linear_k", "linear_v", "linear_out", "w_1", "w_2"]
LORA = {"peft": "lora", "peft_conf": {"target_modules": TARGETS, "rank": 8, "alpha": 16}}


def lora_in(part: str) -> dict[str, Any]:
    """A LoRA block (rank 8, the recipe's budget) on the attention and feed-forward linears of ``part``."""
    return {
        "peft": "lora",
        "peft_conf": {"target_modules": [rf"{part}\..*\.{t}" for t in TARGETS], "rank": 8, "alpha": 16},
    }


SYSTEMS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": LORA,
    "f0": {"fusion": {"variant": "weighted_sum"}},
    "f1": {"fusion": {"variant": "grouped", "groups": 3}},
    "f2": {"fusion": {"variant": "ladder", "reduction": 8, "attention_heads": 2}},
    "f1+lora": {"fusion": {"variant": "grouped", "groups": 3}, **lora_in("encoder")},
    "f1+dec": {"fusion": {"variant": "grouped", "groups": 3, "train_modules": ["ctc"]}, **lora_in("decoder")},
}
FUSION_ONLY = ("f0", "f1", "f2")
FUSION_STEP_TARGET = 0.5
FUSION_MEMORY_TARGET = 0.5
ADAPTED_STEP_TARGET = 0.65
ENCODER_SHARE_TARGET = 0.1
CACHE_TARGET = 0.3


@dataclass
class Bench:
    """A model to benchmark: its task, its config (with ``peft_pretrained``), how to make a batch."""

    name: str
    task: type
    config: dict[str, Any]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]


@dataclass
class Row:
    system: str
    trainable: int
    encoder_trainable: int
    step_seconds: float
    activation_bytes: int


def recipe_bench(work: Path, quick: bool) -> Bench:
    from espnet_plugins.tasks.asr import PeftASRTask

    config = yaml.safe_load((RECIPE_BASE / "config.yaml").read_text())
    config.update(specaug=None)
    weights = RECIPE_BASE / "valid.acc.ave.pth"
    if quick:
        config["encoder_conf"] = {
            **config["encoder_conf"],
            "num_blocks": 2,
            "output_size": 32,
            "linear_units": 64,
        }
        config["decoder_conf"] = {**config["decoder_conf"], "num_blocks": 1, "linear_units": 64}
        weights = save_random_base(PeftASRTask, config, work / "recipe_quick")
    config["peft_pretrained"] = str(weights)
    vocabulary = len(config["token_list"])
    utterances, seconds = (2, 1.0) if quick else (8, 3.0)

    def batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        samples = int(seconds * 16000)
        text = torch.randint(2, vocabulary - 1, (utterances, 12), generator=generator)
        return {
            "speech": 0.1 * torch.randn(utterances, samples, generator=generator),
            "speech_lengths": torch.full((utterances,), samples),
            "text": text,
            "text_lengths": torch.full((utterances,), 12),
        }

    return Bench("recipe", PeftASRTask, config, batch)


def owsm_bench(work: Path, quick: bool) -> Bench:
    from espnet_plugins.tasks.s2t import PeftS2TTask

    config = build_config(work, "quick" if quick else "0.1b")
    config["peft_pretrained"] = str(
        save_random_base(PeftS2TTask, config, work / ("owsm_quick" if quick else "owsm"))
    )
    utterances, seconds = (2, 1.0) if quick else (4, 8.0)
    words = 4 if quick else 30

    def batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
        return s2t_batch(config["token_list"], utterances, seconds, words, generator)

    return Bench("owsm", PeftS2TTask, config, batch)


def save_random_base(task: type, config: dict[str, Any], directory: Path) -> Path:
    """A model file of the architecture with random weights, its config.yaml beside it (made once)."""
    path = directory / "model.pth"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        stock = next(base for base in task.__mro__ if base.__name__ in ("ASRTask", "S2TTask"))
        model = stock.build_model(argparse.Namespace(**config))
        torch.save(model.state_dict(), path)
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def build(bench: Bench, system: str, extra: dict[str, Any] | None = None) -> torch.nn.Module:
    """The system's model, built by the plugin's task from the config with the system's blocks."""
    config = {**bench.config, **SYSTEMS[system], **(extra or {})}
    if system == "full":
        config = {key: value for key, value in config.items() if not key.startswith("peft")}
        model = bench.task.build_model(argparse.Namespace(**config))
        state = torch.load(bench.config["peft_pretrained"], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.train()
    return bench.task.build_model(argparse.Namespace(**config)).train()


def training_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss, _, _ = model(**batch)
    loss.backward()
    optimizer.step()


def measure(bench: Bench, system: str, steps: int) -> Row:
    model = build(bench, system)
    trainable = [p for p in model.parameters() if p.requires_grad]
    encoder = sum(
        p.numel() for name, p in model.named_parameters() if name.startswith("encoder.") and p.requires_grad
    )
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batches = [bench.batch(generator) for _ in range(steps + 1)]
    training_step(model, optimizer, batches[0])
    seconds = []
    for batch in batches[1:]:
        start = time.perf_counter()
        training_step(model, optimizer, batch)
        seconds.append(time.perf_counter() - start)
    memory = saved_for_backward_bytes(model, **batches[0])
    return Row(system, sum(p.numel() for p in trainable), encoder, statistics.median(seconds), memory)


def epoch_seconds(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for batch in batches:
        training_step(model, optimizer, batch)
    return time.perf_counter() - start


def cache_epochs(bench: Bench, batches: int) -> tuple[float, float]:
    """Seconds of an f1 epoch without the cache, and with a cache that a first epoch filled."""
    generator = torch.Generator().manual_seed(1)
    data = [bench.batch(generator) for _ in range(batches)]
    uncached = epoch_seconds(build(bench, "f1"), data)
    with tempfile.TemporaryDirectory() as directory:
        cache = {"fusion": {**SYSTEMS["f1"]["fusion"], "cache_dir": directory, "cache_max_gb": 8}}
        model = build(bench, "f1", cache)
        epoch_seconds(model, data)
        warm = epoch_seconds(model, data)
    return uncached, warm


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def report(bench: Bench, rows: dict[str, Row], uncached: float, warm: float, steps: int) -> int:
    """Print the table and the target checks; the number of missed targets."""
    lora, full = rows["lora"], rows["full"]
    print(f"\n{bench.name}: median of {steps} training steps per system")
    header = (
        f"{'system':<8} {'trainable':>11} {'encoder':>11} {'step s':>8} {'x lora':>7} {'x full':>7} "
        f"{'activations MB':>15} {'x lora':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows.values():
        print(
            f"{row.system:<8} {row.trainable:>11,} {row.encoder_trainable:>11,} {row.step_seconds:>8.3f} "
            f"{row.step_seconds / lora.step_seconds:>7.2f} {row.step_seconds / full.step_seconds:>7.2f} "
            f"{row.activation_bytes / MB:>15.1f} {row.activation_bytes / max(lora.activation_bytes, 1):>7.2f}"
        )
    print(f"f1 epoch: {uncached:.2f} s uncached, {warm:.2f} s with a warm tap cache ({warm / uncached:.2f}x)")
    checks = []
    for name in FUSION_ONLY:
        row = rows[name]
        step, memory = row.step_seconds / lora.step_seconds, row.activation_bytes / lora.activation_bytes
        checks.append((f"{name} step <= {FUSION_STEP_TARGET} x lora", step, step <= FUSION_STEP_TARGET))
        checks.append(
            (f"{name} activations <= {FUSION_MEMORY_TARGET} x lora", memory, memory <= FUSION_MEMORY_TARGET)
        )
    adapted = rows["f1+lora"]
    step = adapted.step_seconds / full.step_seconds
    share = adapted.encoder_trainable / full.encoder_trainable
    checks.append((f"f1+lora step <= {ADAPTED_STEP_TARGET} x full", step, step <= ADAPTED_STEP_TARGET))
    checks.append(
        (f"f1+lora trainable encoder <= {ENCODER_SHARE_TARGET} x full", share, share <= ENCODER_SHARE_TARGET)
    )
    checks.append(
        (f"warm-cache epoch <= {CACHE_TARGET} x uncached", warm / uncached, warm / uncached <= CACHE_TARGET)
    )
    for name, value, passed in checks:
        print(f"  {name:<42} {value:6.2f}  {verdict(passed)}")
    return sum(not passed for _, _, passed in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["recipe", "owsm"], default=["recipe", "owsm"])
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per system")
    parser.add_argument("--batches", type=int, default=6, help="batches of an epoch in the cache rows")
    parser.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
    parser.add_argument("--work-dir", type=Path, default=Path("exp/fusion_speed"), help="random base models")
    args = parser.parse_args(argv)
    from espnet_plugins.offline import import_without_downloads

    import_without_downloads("espnet2.text.phoneme_tokenizer")
    builders = {"recipe": recipe_bench, "owsm": owsm_bench}
    missed = 0
    for name in args.models:
        bench = builders[name](args.work_dir, args.quick)
        rows = {system: measure(bench, system, args.steps) for system in SYSTEMS}
        uncached, warm = cache_epochs(bench, args.batches)
        missed += report(bench, rows, uncached, warm, args.steps)
    print(f"\n{missed} target(s) missed" if missed else "\nevery target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
