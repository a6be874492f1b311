"""The adapter speed/memory benchmark: its reference layer, its memory count, its verdicts, and a
quick end-to-end run. Nothing here is timed; the timings themselves are the script's output."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark
from torch import nn

from ssvd_peft.layers import EspnetSsvdAdapter

bench = load_benchmark("adapter_speed")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def test_reference_layer_is_the_base_layer_at_init():
    linear = nn.Linear(12, 12)
    reference = bench.EspnetSsvdLinear(linear, k=5)
    x = torch.randn(7, 12)
    torch.testing.assert_close(reference(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(12, 12), (14, 9)])
def test_reference_layer_equals_the_espnet_compat_adapter(shape):
    """Same singular vectors and parameters: ESPnet's formula and espnet_compat give one output."""
    linear, k = nn.Linear(*shape), 5
    reference = bench.EspnetSsvdLinear(linear, k)
    adapter = EspnetSsvdAdapter(linear, k, init_weights=False)
    u, v = (adapter.singular_U, adapter.singular_V)
    if reference.transposed:
        u, v = v, u
    with torch.no_grad():
        reference.U[:, :k] = u
        reference.V[:k] = v.T
        reference.s_delta.copy_(adapter.ssvd_shift)
        reference.gate.copy_(adapter.ssvd_gate)
        reference.skew.copy_(adapter.ssvd_inner if adapter.k_in else adapter.ssvd_outer)
    x = torch.randn(6, shape[0])
    expected = adapter(x, linear)
    assert (expected - linear(x)).abs().max() > 1e-3, "the adapter must not be the identity here"
    torch.testing.assert_close(reference(x), expected, rtol=1e-4, atol=1e-5)


def test_saved_bytes_count_each_storage_once_and_skip_parameters():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    x = torch.randn(5, 4)
    # Linear saves x (its weight is a parameter); tanh saves its 5 x 6 output.
    assert bench.saved_for_backward_bytes(model, x) == (5 * 4 + 5 * 6) * 4
    model.requires_grad_(False)
    assert bench.saved_for_backward_bytes(model, x) == 0


def test_every_repeat_runs_each_step_once_in_a_changing_order():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times, repeats = bench.median_step_seconds(steps, warmup=1, repeats=6)
    assert set(times) == set("abcd") and repeats == 6
    rounds = ["".join(calls[i : i + 4]) for i in range(0, len(calls), 4)]
    assert rounds[0] == "abcd", "warm-up runs every step once"
    assert all(sorted(r) == list("abcd") for r in rounds[1:])
    assert len(set(rounds[1:])) > 1, "the order changes between repeats"


def test_steps_repeat_until_the_time_budget_is_spent(monkeypatch):
    clock = [0.0]  # a fake clock: each step takes exactly 1/512 s (exact in binary), whatever the load

    def step() -> None:
        clock[0] += 1 / 512

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    medians, repeats = bench.median_step_seconds({"slow": step}, warmup=0, repeats=2, min_seconds=15 / 512)
    assert repeats == 15 and medians["slow"] == 1 / 512


def measurement(name: str, ms: float, adapter_mb: float, trainable: int = 1) -> object:
    return bench.Measurement(name, "", trainable, ms / 1e3, int(adapter_mb * bench.MB), 0, 0)


@pytest.mark.parametrize(
    ("k_ratio", "ssvd_ms", "expected"),
    [(0.4, 79.0, "PASS"), (0.4, 81.0, "FAIL"), (0.1, 59.0, "PASS"), (0.1, 61.0, "FAIL")],
)
def test_step_time_target_depends_on_k(k_ratio, ssvd_ms, expected):
    case = bench.Case(width=64, tokens=10, k_ratio=k_ratio, k=6, depth=2)
    results = [
        measurement("espnet", 100.0, 10.0),
        measurement("ssvd", ssvd_ms, 4.0),
        measurement("ssvd_o", ssvd_ms, 6.0),
        measurement("lora r=1", 40.0, 1.0),
        measurement("base", 10.0, 0.0, trainable=0),
        measurement("merged", 10.4, 0.0, trainable=0),
    ]
    rows = {check: passed for check, _, _, passed in bench.check_rows(case, results)}
    assert rows["ssvd step time / espnet"] is (expected == "PASS")
    assert rows["ssvd buffers+saved / espnet"] is True
    assert rows["ssvd_o buffers+saved / espnet"] is False
    assert rows["merged forward / base forward"] is True
    lora_check = rows["ssvd step time / lora r=1 (equal budget)"]
    assert lora_check is (False if k_ratio <= 0.1 else None), "LoRA target only at k <= 0.1 m"


def test_lora_rank_matches_the_ssvd_budget():
    base = bench.LinearStack(32, 2)
    _, budget = bench.adapted_stack(base, "ssvd", k=8)
    rank = bench.lora_rank_for_budget(base, budget)
    per_rank = 2 * (32 + 32)
    assert abs(rank * per_rank - budget) <= per_rank / 2


def test_quick_run_prints_one_table_per_case(capsys):
    assert bench.main(["--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("### d = 32, T = 16 tokens") == 2
    for variant in ("espnet", "ssvd", "ssvd_o", "lora r=", "base", "merged"):
        assert f"| {variant}" in out
    assert out.count("| merged forward / base forward |") == 2
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ssvd")]
    verdicts = [cells[-2].strip() for cells in rows if cells[1].strip().endswith("/ espnet")]
    assert len(verdicts) == 2 * 2 * 2 and set(verdicts) <= {"PASS", "FAIL"}
