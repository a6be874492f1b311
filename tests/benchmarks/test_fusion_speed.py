"""The fusion benchmark builds each system as the plugin's task does (what trains where) and a quick
run prints its table; the timings themselves are the script's output, not asserted here."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark

pytest.importorskip("espnet2")

bench = load_benchmark("fusion_speed")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return bench.recipe_bench(tmp_path_factory.mktemp("fusion_speed"), quick=True)


def test_each_system_trains_what_its_blocks_say(recipe):
    rows = {system: bench.measure(recipe, system, steps=1) for system in bench.SYSTEMS}
    full, lora = rows["full"], rows["lora"]
    assert full.encoder_trainable > lora.encoder_trainable > 0
    assert rows["f0"].encoder_trainable == 3  # one weight per tap: H_0 .. H_2 of the 2-block encoder
    assert rows["f1+lora"].encoder_trainable == rows["f1"].encoder_trainable + lora.encoder_trainable
    # the frozen encoder runs without autograd: fusion saves less for backward than any adapter
    for system in bench.FUSION_ONLY:
        assert rows[system].activation_bytes < lora.activation_bytes < full.activation_bytes


def test_a_quick_run_prints_every_system_and_target(capsys, tmp_path):
    assert (
        bench.main(
            ["--quick", "--models", "recipe", "--steps", "1", "--batches", "2", "--work-dir", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    for system in bench.SYSTEMS:
        assert f"\n{system} " in out
    assert "warm tap cache" in out and out.count("PASS") + out.count("FAIL") == 9
