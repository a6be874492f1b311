"""The merge benchmark's two modes merge to the same model, and a quick run prints its table; the
timings and memory themselves are the script's output, not asserted here."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

pytest.importorskip("espnet2")

bench = load_benchmark("merge_speed")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    work = tmp_path_factory.mktemp("merge_speed")
    return work, *bench.write_models(work, 2, quick=True)


def test_fine_tunes_move_every_floating_tensor_a_little(models):
    _, base, tuned = models
    base_state = torch.load(base, weights_only=True)
    for path in tuned:
        state = torch.load(path, weights_only=True)
        assert state.keys() == base_state.keys()
        for key, value in base_state.items():
            if value.is_floating_point() and value.numel() > 1:
                moved = float((state[key] - value).norm())
                if value.any():
                    assert 0 < moved / float(value.norm()) < 0.2, key
                else:  # an all-zero tensor (e.g. a feature-normalisation mean) moves by absolute noise
                    assert moved > 0, key


@pytest.mark.parametrize("method", ["ties", "tsv_m"])
def test_streamed_and_in_memory_merges_write_the_same_model(models, method):
    work, base, tuned = models
    reports = {}
    for mode in ("stream", "memory"):
        job = {"mode": mode, "base": str(base), "models": [str(p) for p in tuned], "method": method}
        job["output"] = str(work / f"{mode}.pth")
        reports[mode] = bench.run_worker(job)
        assert reports[mode]["seconds"] > 0 and reports[mode]["peak_mb"] >= reports[mode]["floor_mb"] > 0
    streamed = torch.load(work / "stream.pth", weights_only=True)
    in_memory = torch.load(work / "memory.pth", weights_only=True)
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[key], in_memory[key]) for key in in_memory)


def test_a_quick_run_prints_a_row_per_method_and_count(models, capsys):
    work, _, _ = models
    bench.main(["--quick", "--methods", "task_arithmetic", "--models", "1", "2", "--work-dir", str(work)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("task_arithmetic")]
    assert [row.split()[1] for row in rows] == ["1", "2"]
    assert all("RSS" in row and "time" in row for row in rows)
