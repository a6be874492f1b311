"""The peak-memory benchmark builds each system as ``s2t_train`` does, adapters train the same under
ESPnet's activation checkpointing, and a quick run prints its table; the memory and timings
themselves are the script's output, not asserted here."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

from ssvd_peft.layers.base import ADAPTERS_ATTR

pytest.importorskip("espnet2")

bench = load_benchmark("peak_memory")


def job(tmp_path, method: str, checkpointing: bool) -> object:
    return bench.Job("quick", method, checkpointing, 1, str(tmp_path))


def test_checkpointing_covers_the_subsampling_and_every_block(tmp_path):
    from owsm_shapes import build_config

    config = bench.system_config(build_config(tmp_path, "quick"), job(tmp_path, "lora", True))
    assert config["encoder_conf"]["gradient_checkpoint_layers"] == [0, 1, 2]
    assert config["decoder_conf"]["gradient_checkpoint_layers"] == [1, 2]
    assert config["peft"] == "lora" and config["peft_conf"]["rank"] == 32


@pytest.mark.parametrize("method", ["lora", "ssvd_o"])
def test_adapters_get_the_same_gradients_with_activation_checkpointing(tmp_path, method):
    from owsm_shapes import s2t_batch

    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapter initialisation and dropout masks
        model, token_list = bench.build_system(job(tmp_path, method, checkpointing))
        batch = s2t_batch(token_list, 1, bench.SECONDS, bench.WORDS, torch.Generator().manual_seed(0))
        loss, _, _ = model(**batch)
        loss.backward()
        trained = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        assert trained and all(grad is not None for grad in trained.values())
        assert any(grad.abs().sum() > 0 for grad in trained.values())
        assert all(f".{ADAPTERS_ATTR}." in name for name in trained)
        gradients.append(trained)
    without, with_checkpointing = gradients
    assert without.keys() == with_checkpointing.keys()
    for name, grad in without.items():
        torch.testing.assert_close(with_checkpointing[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_quick_run_prints_a_row_per_method_and_setting(tmp_path, capsys):
    code = bench.main(["--quick", "--methods", "full", "lora", "--work-dir", str(tmp_path)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    rows = [line.split() for line in printed.out.splitlines() if line.startswith("quick")]
    settings = [(row[1], row[2]) for row in rows]
    assert settings == [("off", "full"), ("off", "lora"), ("on", "full"), ("on", "lora")], printed.err
    assert all(float(row[5]) > 0 and float(row[7]) > 0 and float(row[8]) > 0 for row in rows)


class TwoLinears(torch.nn.Module):
    """x -> W2 (W1 x): the loss is the sum of the output."""

    def __init__(self, frozen_first: bool) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 3, bias=False)
        self.first.requires_grad_(not frozen_first)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.second(self.first(x)).sum(),)


@pytest.mark.parametrize("frozen_first", [False, True])
def test_a_training_step_counts_the_forward_and_every_gradient_product(frozen_first):
    """Forward 2 b (6*5 + 5*3); backward: the second layer's weight gradient, and unless the first
    layer is frozen its weight gradient and the second layer's input gradient that feeds it (the
    data itself needs no gradient)."""
    batch = 4
    model = TwoLinears(frozen_first)
    flops = bench.training_step_flops(model, {"x": torch.randn(batch, 6)})
    forward = 2 * batch * (6 * 5 + 5 * 3)
    backward = 2 * batch * 5 * 3 + (0 if frozen_first else 2 * batch * (5 * 3 + 6 * 5))
    assert flops == forward + backward
    assert all(p.grad is None for p in model.parameters()), "gradients are cleared"


def test_flops_only_prints_the_work_of_each_step_against_full_fine_tuning(tmp_path, capsys):
    code = bench.main(["--quick", "--methods", "full", "lora", "--flops-only", "--work-dir", str(tmp_path)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    rows = [line.split() for line in printed.out.splitlines() if line.startswith("quick")]
    settings = [(row[1], row[2]) for row in rows]
    assert settings == [("off", "full"), ("off", "lora"), ("on", "full"), ("on", "lora")], printed.err
    assert float(rows[0][5]) == 1.0 and float(rows[2][5]) == 1.0
    assert float(rows[1][5]) < 1.0, "no weight gradients of the frozen base"


@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_a_depthwise_convolutions_gradients_each_cost_its_forward(input_needs_grad):
    """Forward 2 b L_out C k for a depthwise Conv1d of C channels; each gradient (weight, and the
    input's when it needs one) as much again, not C times as much."""
    channels, length, kernel, batch = 8, 20, 3, 2
    conv = torch.nn.Conv1d(channels, channels, kernel, groups=channels, bias=False)

    class Depthwise(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (conv(x).sum(),)

    x = torch.randn(batch, channels, length, requires_grad=input_needs_grad)
    flops = bench.training_step_flops(Depthwise(), {"x": x})
    forward = 2 * batch * (length - kernel + 1) * channels * kernel
    assert flops == forward * (3 if input_needs_grad else 2)
