"""Every method in bfloat16 and float16 on the CPU: forward and merge, after ``model.to(dtype)``.

Speech models are often run in half precision. The k x k rotations of SSVD / SSVD-O run in
float64 (the CPU has no bfloat16 LU solve, and matrix_exp overflows in half precision), updates
are merged in float32, and DoRA's row norm is computed in float32. Outputs must stay finite and
within half-precision rounding of the float32 model.
"""

from __future__ import annotations

import pytest
import torch
from layer_builders import rel_err
from torch import nn

from ssvd_peft.inject import inject_adapters, merge_adapters, unmerge_adapters

HALF = [torch.bfloat16, torch.float16]
CASES = {
    "lora": ("lora", {"rank": 4}),
    "dora": ("dora", {"rank": 4}),
    "pissa": ("pissa", {"rank": 4}),
    "ssvd-cayley": ("ssvd", {"k": 6, "rotation": "cayley"}),
    "ssvd-expm": ("ssvd", {"k": 6, "rotation": "expm"}),
    "ssvd-neumann": ("ssvd", {"k": 6, "rotation": "neumann"}),
    "ssvd-espnet_compat": ("ssvd", {"k": 6, "espnet_compat": True}),
    "ssvd_o": ("ssvd_o", {"k": 6, "outer_share": 0.5}),
    "hdmole": ("hdmole", {"rank": 2, "num_domains": 2}),
}
MERGEABLE = [case for case in CASES if case != "hdmole"]
# bfloat16 keeps 8 significant bits, float16 11: a few roundings along a 3-layer network.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


class ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(12, 20)
        self.mid = nn.Linear(20, 20)
        self.down = nn.Linear(20, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def adapted(case: str, init_weights: bool) -> nn.Module:
    method, options = CASES[case]
    model = ThreeLayers()
    inject_adapters(model, method, target_modules=["up", "mid", "down"], init_weights=init_weights, **options)
    return model.eval()


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", CASES)
def test_half_precision_forward_is_finite_and_follows_float32(case, dtype, inputs):
    model = adapted(case, init_weights=False)
    reference = model(inputs).detach()
    model.to(dtype)
    output = model(inputs.to(dtype))
    assert output.dtype == dtype and bool(torch.isfinite(output).all())
    assert rel_err(output, reference) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", [case for case in CASES if case != "ssvd-espnet_compat"])
def test_half_precision_identity_at_init(case, dtype, inputs):
    model = adapted(case, init_weights=True)
    plain = ThreeLayers().to(dtype)
    model.to(dtype)
    assert rel_err(model(inputs.to(dtype)), plain(inputs.to(dtype))) < TOLERANCE[dtype] / 5


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", MERGEABLE)
def test_half_precision_merge_keeps_the_output_and_unmerge_the_weights(case, dtype, inputs):
    model = adapted(case, init_weights=False).to(dtype)
    x = inputs.to(dtype)
    unmerged = model(x)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if "base_layer" in name}

    merge_adapters(model)
    merged = model(x)
    assert bool(torch.isfinite(merged).all())
    assert rel_err(merged, unmerged) < TOLERANCE[dtype]
    unmerge_adapters(model)

    for name, before in weights.items():
        assert rel_err(model.get_parameter(name), before) < TOLERANCE[dtype] / 5, name


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", CASES)
def test_half_precision_training_step_gives_finite_gradients(case, dtype, inputs):
    model = adapted(case, init_weights=False).train().to(dtype)
    model(inputs.to(dtype)).float().pow(2).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in trainable)
