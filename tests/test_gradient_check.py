"""A targeted adapter that receives no gradient in the first training step is a loud error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.gradient_check import AdapterGradientError, require_adapter_gradients
from ssvd_peft.inject import inject_adapters


class ReadsWeightDirectly(nn.Module):
    """``proj`` is a Linear whose forward is never called: the module reads its weight, as
    torch.nn.MultiheadAttention reads ``in_proj_weight``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(F.linear(x, self.proj.weight, self.proj.bias)))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("method", ["lora", "ssvd", "pissa"])
def test_an_adapter_whose_forward_never_runs_fails_the_first_step(method):
    model = ReadsWeightDirectly()
    inject_adapters(
        model, method, target_modules=["proj", "head"], **({"rank": 2} if method != "ssvd" else {})
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    require_adapter_gradients(model, optimizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(AdapterGradientError, match=r"received no gradient .* in 1 modules: proj\."):
        train_step(model, optimizer)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), "the refused step changed nothing"


def test_adapters_that_take_part_pass_and_the_check_runs_once():
    model = ReadsWeightDirectly()
    inject_adapters(model, "lora", target_modules=["head"], rank=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    require_adapter_gradients(model, optimizer)
    train_step(model, optimizer)  # lora_A's gradient is zero (B = 0), not missing: it passes
    assert model.head.peft_adapters["default"].lora_A.grad is not None
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()  # a later step without gradients is not checked again
