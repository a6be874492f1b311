"""A self-contained demonstration: learning vs forgetting of every method at one budget.

A small attention + feed-forward frame classifier (module names as in ESPnet: linear_q,
linear_k, linear_v, linear_out, w_1, w_2, ctc_lo) is pretrained on a synthetic SOURCE domain:
frame features are noisy class prototypes. The TARGET domain is shifted the way an accent
shifts speech: a fixed warp of the feature space plus moved prototypes for part of the classes.
Each method is injected into a copy of the pretrained model at the same trainable budget,
trained on the target domain, and measured on both domains (frame error rate), then merged
and checked against its unmerged outputs.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.budget import equal_budget_configs, estimate_budget, format_budget_table
from ssvd_peft.inject import inject_adapters, merge_and_unload

FEATURES, CLASSES, FRAMES = 40, 24, 60
TARGETS = ["linear_q", "linear_k", "linear_v", "linear_out", "w_1", "w_2"]


class Block(nn.Module):
    """Pre-norm self-attention and feed-forward block with ESPnet's module names."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_mha = nn.LayerNorm(dim)
        self.linear_q, self.linear_k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.linear_v, self.linear_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.w_1, self.w_2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm_mha(x)
        split = [
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for t in (self.linear_q(h), self.linear_k(h), self.linear_v(h))
        ]
        attended = F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(-2)
        x = x + self.linear_out(attended)
        return x + self.w_2(F.relu(self.w_1(self.norm_ff(x))))


class FrameClassifier(nn.Module):
    def __init__(self, dim: int = 64, blocks: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, dim)
        self.encoders = nn.ModuleList(Block(dim, heads) for _ in range(blocks))
        self.ctc_lo = nn.Linear(dim, CLASSES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.embed(features)
        for block in self.encoders:
            x = block(x)
        return self.ctc_lo(x)


@dataclass
class Domain:
    """Class prototypes and a feature warp: features = (prototype[label] + noise) @ warp."""

    prototypes: torch.Tensor
    warp: torch.Tensor
    noise: float = 1.6

    def sample(self, utterances: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.randint(2, 7, (utterances, FRAMES), generator=generator)
        labels = torch.randint(0, CLASSES, (utterances, FRAMES), generator=generator)
        frames = torch.stack(
            [torch.repeat_interleave(row, n)[:FRAMES] for row, n in zip(labels, lengths, strict=True)]
        )
        clean = self.prototypes[frames]
        noisy = clean + self.noise * torch.randn(clean.shape, generator=generator)
        return noisy @ self.warp, frames


def make_domains(seed: int) -> tuple[Domain, Domain]:
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(CLASSES, FEATURES, generator=g)
    source = Domain(prototypes, torch.eye(FEATURES))
    moved = prototypes.clone()
    moved[: CLASSES // 2] += 1.2 * torch.randn(CLASSES // 2, FEATURES, generator=g)
    warp = torch.eye(FEATURES) + 0.8 * torch.randn(FEATURES, FEATURES, generator=g) / math.sqrt(FEATURES)
    return source, Domain(moved, warp)


def train(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float, seed: int
) -> float:
    """Adam on random mini-batches; returns the seconds spent."""
    features, labels = data
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        batch = torch.randint(0, features.shape[0], (16,), generator=g)
        loss = F.cross_entropy(model(features[batch]).flatten(0, 1), labels[batch].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def frame_error_rate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    features, labels = data
    return 100.0 * float((model(features).argmax(-1) != labels).float().mean())


@dataclass
class Result:
    """One line of the report."""

    method: str
    setting: str
    trainable: int
    target_fer: float
    source_fer: float
    train_seconds: float
    merge_error: float | None = None


def run_showcase(steps: int = 300, pretrain_steps: int = 600, seed: int = 0) -> str:
    """Pretrain, adapt with every method at one budget, and return the printed report."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    source, target = make_domains(seed)
    source_train, source_test = source.sample(400, g), source.sample(100, g)
    target_adapt, target_test = target.sample(150, g), target.sample(100, g)
    base = FrameClassifier()
    train(base, source_train, pretrain_steps, lr=3e-3, seed=seed)

    def measure(model: nn.Module) -> tuple[float, float]:
        return frame_error_rate(model, target_test), frame_error_rate(model, source_test)

    results = [Result("base", "zero-shot", 0, *measure(base), 0.0)]
    full = copy.deepcopy(base)
    seconds = train(full, target_adapt, steps, lr=1e-3, seed=seed)
    results.append(Result("full FT", "all weights", _count(full), *measure(full), seconds))

    budget = estimate_budget(base, "lora", target_modules=TARGETS, rank=2).trainable
    methods = {method: {"target_modules": TARGETS} for method in ("lora", "dora", "pissa", "ssvd", "ssvd_o")}
    ssvd_o_table = ""
    for method, match in equal_budget_configs(base, budget, methods, strict=True).items():
        config = match.config
        model = copy.deepcopy(base)
        report = inject_adapters(model, config)
        if method == "ssvd_o":
            ssvd_o_table = format_budget_table(report, per_module=False)
        seconds = train(model, target_adapt, steps, lr=1e-2, seed=seed)
        errors = measure(model)
        with torch.no_grad():
            adapted = model(target_test[0])
            merged = merge_and_unload(model)(target_test[0])
        setting = f"rank {config.rank}" if hasattr(config, "rank") else f"k {config.k}"
        merge_error = float((adapted - merged).abs().max())
        results.append(Result(method, setting, report.trainable, *errors, seconds, merge_error))

    return "\n".join(
        [
            "ssvd-peft showcase: learning (target FER) vs forgetting (source FER), frame error rate %",
            f"base model: {_count(base):,} parameters, pretrained on the source domain; "
            f"adapters at an equal budget of ~{budget:,} parameters",
            "",
            format_results(results),
            "",
            "SSVD-O budget by subspace (inner = input side, outer = output side, values = shifts):",
            ssvd_o_table,
        ]
    )


def format_results(results: list[Result]) -> str:
    """A markdown table; merge err = max |merged - unmerged| output."""
    lines = [
        "| method | setting | trainable | target FER | source FER | train s | merge err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        error = "-" if r.merge_error is None else f"{r.merge_error:.1e}"
        lines.append(
            f"| {r.method} | {r.setting} | {r.trainable:,} | {r.target_fer:.1f} | {r.source_fer:.1f} "
            f"| {r.train_seconds:.1f} | {error} |"
        )
    return "\n".join(lines)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
