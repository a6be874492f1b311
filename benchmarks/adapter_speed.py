"""Step time and memory of SSVD / SSVD-O against ESPnet master's formula, LoRA and a merged model.

    python benchmarks/adapter_speed.py            # d 512 1024, T 200 2000, k 0.1 m and 0.4 m
    python benchmarks/adapter_speed.py --quick    # tiny sizes, a few seconds (smoke test)

Each case (d, T, k ratio) builds one stack of ``--layers`` square d x d Linear layers and copies
it into every variant, so all share the same base weights:

    espnet    ESPnet master's SSVDLinear formula (``EspnetSsvdLinear``): W' rebuilt every forward
    ssvd      this library's SSVD at k = ratio * d
    ssvd_o    this library's SSVD-O at k = ratio * d
    lora r=.. LoRA whose total trainable count is closest to SSVD's (and to SSVD-O's, if different)
    base      the plain stack, inference forward
    merged    SSVD-O folded into the weights by ``merge_adapters``, inference forward

A training step is forward + backward of mean(y^2) + an AdamW step over T tokens. Step times
are medians over at least ``--repeats`` repeats, and more until the case has run
``--min-seconds`` of timed steps, after ``--warmup`` warm-up steps; each repeat runs every
variant once, in a new shuffled order, so machine noise hits all alike. Memory is counted, not
sampled: the adapter buffers, plus the unique storages saved for backward during one forward
(``saved_tensors_hooks``; parameters and buffers are not counted again). ``total`` adds all
parameters and, per trainable parameter, its gradient and two AdamW moments.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from autograd_memory import saved_for_backward_bytes, unique_bytes
from torch import nn

from ssvd_peft.budget import equal_budget_configs
from ssvd_peft.inject import inject_adapters, merge_adapters
from ssvd_peft.layers.ssvd import prefers_merged_path

TARGETS = [r"layers\.\d+"]
MB = 2.0**20
TIME_TARGETS = ((0.1, 0.6), (0.4, 0.8))
MEMORY_TARGET = 0.5
LORA_TARGET = 1.3
LORA_TARGET_MAX_RATIO = 0.1
MERGED_TARGET = 1.05


class EspnetSsvdLinear(nn.Module):
    """ESPnet master's SSVDLinear formula, kept as the reference; W' is rebuilt on every forward.

    With the full SVD W = U diag(s) V (U: out x m, V: m x in, s: m, m = min(in, out)):

        sigma = s + pad(sigmoid(g) d, m - k),   A = I + 2 S,   S skew from k (k - 1) / 2 numbers,
        V' = [A V[:k]; V[k:]],   W' = U diag(sigma) V',   y = x W'^T + b.

    For out < in the same is done on W^T. The rebuild is ESPnet's own expression,
    ``U @ torch.diag(sigma) @ V'``: an out x m x m product with the dense diagonal matrix, then an
    out x m x in one, on every forward.
    """

    def __init__(self, linear: nn.Linear, k: int) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.transposed = linear.out_features < linear.in_features
        u, s, v = torch.linalg.svd(weight.T if self.transposed else weight, full_matrices=False)
        self.register_buffer("U", u)
        self.register_buffer("s", s)
        self.register_buffer("V", v)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), False)
        self.k = k
        self.s_delta = nn.Parameter(torch.zeros(k))
        self.gate = nn.Parameter(torch.zeros(1))
        self.skew = nn.Parameter(torch.zeros(k * (k - 1) // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        sigma = self.s + F.pad(self.s_delta * torch.sigmoid(self.gate), (0, self.s.numel() - k))
        rows, cols = torch.triu_indices(k, k, offset=1)
        upper = self.skew.new_zeros(k, k).index_put((rows, cols), self.skew)
        rotation = torch.eye(k, dtype=upper.dtype) + 2.0 * (upper.T - upper)
        v_rotated = torch.cat([rotation @ self.V[:k], self.V[k:]])
        weight = self.U @ torch.diag(sigma) @ v_rotated
        return F.linear(x, weight.T if self.transposed else weight, self.bias)


class LinearStack(nn.Module):
    """``depth`` square Linear layers applied one after the other."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@dataclass
class Variant:
    """One model of a case: how it runs (training step or inference forward) and its label."""

    name: str
    model: nn.Module
    training: bool

    def __post_init__(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True) if self.training else None

    @property
    def trainable(self) -> int:
        """Trainable parameters of a training variant (0 for an inference variant)."""
        if not self.training:
            return 0
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step(self, x: torch.Tensor) -> None:
        if not self.training:
            with torch.inference_mode():
                self.model(x)
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.model(x).square().mean().backward()
        self.optimizer.step()


@dataclass(frozen=True)
class Measurement:
    """Median step time and counted memory of one variant."""

    name: str
    path: str
    trainable: int
    seconds: float
    buffer_bytes: int
    saved_bytes: int
    total_bytes: int

    @property
    def adapter_bytes(self) -> int:
        return self.buffer_bytes + self.saved_bytes


@dataclass(frozen=True)
class Case:
    width: int
    tokens: int
    k_ratio: float
    k: int
    depth: int


def espnet_stack(base: LinearStack, k: int) -> LinearStack:
    """A copy of ``base`` whose layers compute ESPnet master's SSVD formula."""
    stack = copy.deepcopy(base)
    for index, layer in enumerate(stack.layers):
        stack.layers[index] = EspnetSsvdLinear(layer, k)
    return stack


def adapted_stack(base: LinearStack, method: str, **options: object) -> tuple[LinearStack, int]:
    """A copy of ``base`` with ``method`` injected in every layer, and its trainable count."""
    stack = copy.deepcopy(base)
    report = inject_adapters(stack, method, target_modules=TARGETS, **options)
    return stack, report.trainable


def lora_rank_for_budget(base: LinearStack, budget: int) -> int:
    """LoRA rank whose total trainable count over the stack is closest to ``budget``."""
    return equal_budget_configs(base, budget, {"lora": {"target_modules": TARGETS}}, strict=True)[
        "lora"
    ].value


def variant_path(name: str, case: Case) -> str:
    """How a variant computes its layers at this case's size."""
    if name == "espnet":
        return "rebuild W'"
    if name in ("ssvd", "ssvd_o"):
        merged = prefers_merged_path(case.tokens, case.width, case.width, case.k, training=True)
        return "merged" if merged else "low-rank"
    return "low-rank" if name.startswith("lora") else "dense"


def build_variants(base: LinearStack, k: int) -> list[Variant]:
    """Every variant at subspace size ``k``, all sharing ``base``'s weights."""
    variants = [Variant("espnet", espnet_stack(base, k), True)]
    budgets: dict[str, int] = {}
    for method in ("ssvd", "ssvd_o"):
        model, budgets[method] = adapted_stack(base, method, k=k)
        variants.append(Variant(method, model, True))
    for rank in dict.fromkeys(lora_rank_for_budget(base, budget) for budget in budgets.values()):
        variants.append(Variant(f"lora r={rank}", adapted_stack(base, "lora", rank=rank)[0], True))
    variants.append(Variant("base", copy.deepcopy(base), False))
    merged, _ = adapted_stack(base, "ssvd_o", k=k, init_weights=False)
    merge_adapters(merged)
    variants.append(Variant("merged", merged, False))
    return variants


def median_step_seconds(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, min_seconds: float = 0.0
) -> tuple[dict[str, float], int]:
    """Median wall time of each step and the number of repeats.

    Each repeat runs every step once, in a new shuffled order (so no step always follows the
    same one), for at least ``repeats`` repeats and until the timed steps add up to ``min_seconds``.
    """
    names, order = list(steps), random.Random(0)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    repeat, spent = 0, 0.0
    while repeat < repeats or spent < min_seconds:
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        repeat += 1
    return {name: statistics.median(values) for name, values in times.items()}, repeat


def measure_memory(variant: Variant, x: torch.Tensor) -> tuple[int, int, int]:
    """(buffer bytes, saved-for-backward bytes, total bytes) of one variant."""
    buffers = unique_bytes(variant.model.buffers())
    parameters = unique_bytes(variant.model.parameters())
    if not variant.training:
        return buffers, 0, parameters + buffers
    saved = saved_for_backward_bytes(variant.model, x)
    trainable = [p for p in variant.model.parameters() if p.requires_grad]
    gradient_and_moments = 3 * sum(p.numel() * p.element_size() for p in trainable)
    return buffers, saved, parameters + buffers + saved + gradient_and_moments


def run_case(
    variants: list[Variant], case: Case, warmup: int, repeats: int, min_seconds: float
) -> tuple[list[Measurement], int]:
    """Time and count every variant on one batch of ``case.tokens`` tokens; also the repeats run."""
    torch.manual_seed(0)
    x = torch.randn(case.tokens, case.width)
    steps = {v.name: (lambda v=v: v.step(x)) for v in variants}
    seconds, done = median_step_seconds(steps, warmup, repeats, min_seconds)
    results = []
    for v in variants:
        buffers, saved, total = measure_memory(v, x)
        results.append(
            Measurement(
                v.name, variant_path(v.name, case), v.trainable, seconds[v.name], buffers, saved, total
            )
        )
    return results, done


def time_target(k_ratio: float) -> float | None:
    """The step-time target against the ESPnet formula at this k ratio (None: no target)."""
    for ratio, target in TIME_TARGETS:
        if k_ratio <= ratio + 1e-9:
            return target
    return None


def check_rows(case: Case, results: list[Measurement]) -> list[tuple[str, str, float, bool | None]]:
    """(check, target, measured ratio, passed or None when only reported)."""
    by_name = {m.name: m for m in results}
    espnet, rows = by_name["espnet"], []
    lora = [m for m in results if m.name.startswith("lora")]
    for method in ("ssvd", "ssvd_o"):
        m = by_name[method]
        target = time_target(case.k_ratio)
        ratio = m.seconds / espnet.seconds
        rows.append(
            (
                f"{method} step time / espnet",
                f"<= {target:.2f}x" if target else "report",
                ratio,
                None if target is None else ratio <= target,
            )
        )
        ratio = m.adapter_bytes / espnet.adapter_bytes
        rows.append(
            (f"{method} buffers+saved / espnet", f"<= {MEMORY_TARGET:.2f}x", ratio, ratio <= MEMORY_TARGET)
        )
        partner = min(lora, key=lambda candidate: abs(candidate.trainable - m.trainable))
        ratio = m.seconds / partner.seconds
        bounded = case.k_ratio <= LORA_TARGET_MAX_RATIO + 1e-9
        rows.append(
            (
                f"{method} step time / {partner.name} (equal budget)",
                f"<= {LORA_TARGET:.2f}x" if bounded else "report",
                ratio,
                ratio <= LORA_TARGET if bounded else None,
            )
        )
    ratio = by_name["merged"].seconds / by_name["base"].seconds
    rows.append(("merged forward / base forward", f"<= {MERGED_TARGET:.2f}x", ratio, ratio <= MERGED_TARGET))
    return rows


def format_case(case: Case, results: list[Measurement], repeats: int) -> str:
    """Two markdown tables: the measurements, then the checks with PASS / FAIL."""
    espnet = next(m for m in results if m.name == "espnet")
    base = next(m for m in results if m.name == "base")
    lines = [
        f"### d = {case.width}, T = {case.tokens} tokens, k = {case.k_ratio:g} m = {case.k}, "
        f"{case.depth} layers, median of {repeats} repeats",
        "",
        "| variant | path | trainable | step ms | / espnet | buffers MB | saved MB | buffers+saved MB "
        "| / espnet | total MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        reference = espnet if m.trainable else base
        lines.append(
            f"| {m.name} | {m.path} | {m.trainable:,} | {1e3 * m.seconds:.2f} | "
            f"{m.seconds / reference.seconds:.2f}x | {m.buffer_bytes / MB:.2f} | {m.saved_bytes / MB:.2f} | "
            f"{m.adapter_bytes / MB:.2f} | {_ratio(m.adapter_bytes, espnet.adapter_bytes)} | "
            f"{m.total_bytes / MB:.2f} |"
        )
    lines += ["", "| check | target | measured | result |", "|---|---|---:|---|"]
    for check, target, ratio, passed in check_rows(case, results):
        verdict = "report" if passed is None else ("PASS" if passed else "FAIL")
        lines.append(f"| {check} | {target} | {ratio:.2f}x | {verdict} |")
    lines.append("")
    lines.append("(base and merged run an inference forward; their / espnet column is / base.)")
    return "\n".join(lines)


def _ratio(value: int, reference: int) -> str:
    return f"{value / reference:.2f}x" if reference and value else "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 1024], help="layer widths d")
    parser.add_argument("--tokens", type=int, nargs="+", default=[200, 2000], help="tokens T per step")
    parser.add_argument("--k-ratios", type=float, nargs="+", default=[0.1, 0.4], help="k as a fraction of m")
    parser.add_argument("--layers", type=int, default=4, help="depth of the Linear stack")
    parser.add_argument("--repeats", type=int, default=25, help="least timed repeats per variant (median)")
    parser.add_argument(
        "--min-seconds", type=float, default=20.0, help="repeat a case until its timed steps add up to this"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.tokens, args.k_ratios = [32], [16], [0.1, 0.4]
        args.layers, args.repeats, args.warmup, args.min_seconds = 2, 2, 1, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# Adapter speed and memory: {args.layers} layers, {args.threads} thread(s), "
        f"medians of at least {args.repeats} repeats and {args.min_seconds:g} s of timed steps per case, "
        f"{args.warmup} warm-up steps, torch {torch.__version__}\n"
    )
    for width in args.dims:
        torch.manual_seed(0)
        base = LinearStack(width, args.layers).requires_grad_(False)
        for k_ratio in args.k_ratios:
            k = max(1, round(k_ratio * width))
            variants = build_variants(base, k)
            for tokens in args.tokens:
                case = Case(width, tokens, k_ratio, k, args.layers)
                results, done = run_case(variants, case, args.warmup, args.repeats, args.min_seconds)
                print(format_case(case, results, done), flush=True)
                print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
