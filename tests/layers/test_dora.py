"""DoRA: W' = m * V / ||V||_row with V = W + scale B A; the row norm is a constant in backward.

Checked against HF PEFT 0.21's DoRA layer holding the same factors and magnitude, and against a
hand-written reference of the formula with and without the detach.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_builders import SHAPES, add_adapter, hf_lora_layer, make_linear, rel_err
from torch import nn

from ssvd_peft.layers import DoraAdapter
from ssvd_peft.methods.dora import DoraConfig


def copy_from_hf(adapter: DoraAdapter, hf_layer: nn.Module) -> None:
    with torch.no_grad():
        adapter.lora_A.copy_(hf_layer.lora_A["default"].weight)
        adapter.lora_B.copy_(hf_layer.lora_B["default"].weight)
        adapter.magnitude.copy_(hf_layer.lora_magnitude_vector["default"].weight)


def dora_reference(x, weight, bias, lora_a, lora_b, magnitude, scale, detach_norm):
    """y = x W'^T + b,  W' = m * V / ||V||_row,  V = W + scale B A (norm detached or not)."""
    direction = weight + scale * lora_b @ lora_a
    norm = torch.linalg.vector_norm(direction, dim=1)
    if detach_norm:
        norm = norm.detach()
    return F.linear(x, (magnitude / norm)[:, None] * direction, bias)


def random_dora(shape: str = "tall", bias: bool = True):
    """A DoRA layer with random factors and a magnitude that is not ||W + scale B A||_row."""
    wrapper = add_adapter(
        make_linear(*SHAPES[shape], bias=bias), "dora", rank=4, alpha=8.0, init_weights=False
    )
    adapter = wrapper.peft_adapters["default"]
    with torch.no_grad():
        adapter.magnitude.mul_(1.0 + 0.3 * torch.rand_like(adapter.magnitude))
    return wrapper, adapter


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_identity_at_init(shape, bias):
    base = make_linear(*SHAPES[shape], bias=bias)
    wrapper = add_adapter(base, "dora", rank=4, alpha=8.0)
    adapter = wrapper.peft_adapters["default"]
    x = torch.randn(2, 5, base.in_features)
    torch.testing.assert_close(adapter.magnitude, torch.linalg.vector_norm(base.weight, dim=1))
    torch.testing.assert_close(wrapper(x), base(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_equals_hf_peft_for_the_same_factors(shape, bias, use_rslora):
    base = make_linear(*SHAPES[shape], bias=bias)
    hf = hf_lora_layer(base, r=4, lora_alpha=8, use_dora=True, use_rslora=use_rslora, init_lora_weights=False)
    wrapper = add_adapter(base, "dora", rank=4, alpha=8.0, use_rslora=use_rslora).eval()
    copy_from_hf(wrapper.peft_adapters["default"], hf)
    with torch.no_grad():
        hf.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.3 * torch.rand(base.out_features))
        wrapper.peft_adapters["default"].magnitude.copy_(hf.lora_magnitude_vector["default"].weight)
    x = torch.randn(3, 5, base.in_features)

    assert rel_err(hf(x), base(x)) > 1e-2, "the compared adapters must be non-trivial"
    torch.testing.assert_close(wrapper(x), hf(x), rtol=1e-5, atol=1e-5)


def test_merged_weight_equals_hf_peft_merge():
    base = make_linear(*SHAPES["wide"])
    hf = hf_lora_layer(base, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    wrapper = add_adapter(base, "dora", rank=4, alpha=8.0)
    copy_from_hf(wrapper.peft_adapters["default"], hf)

    wrapper.merge()
    hf.merge()

    torch.testing.assert_close(wrapper.base_layer.weight, hf.base_layer.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_equals_the_reference_formula(shape):
    wrapper, adapter = random_dora(shape)
    base = wrapper.base_layer
    x = torch.randn(7, base.in_features)
    expected = dora_reference(
        x, base.weight, base.bias, adapter.lora_A, adapter.lora_B, adapter.magnitude, adapter.scaling, True
    )
    torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-5)


def test_row_norm_is_detached_in_backward():
    wrapper, adapter = random_dora()
    base = wrapper.base_layer
    x = torch.randn(9, base.in_features)
    upstream = torch.randn(9, base.out_features)
    params = (adapter.lora_A, adapter.lora_B, adapter.magnitude)

    def grads(output: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad((output * upstream).sum(), params))

    ours = grads(wrapper(x))
    detached, attached = (
        grads(dora_reference(x, base.weight, base.bias, *params, adapter.scaling, detach_norm=flag))
        for flag in (True, False)
    )

    for mine, reference in zip(ours, detached, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)
    assert rel_err(detached[0], attached[0]) > 1e-3, "lora_A's gradient depends on the detach"
    assert rel_err(detached[1], attached[1]) > 1e-3, "lora_B's gradient depends on the detach"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_merge_is_exact_and_unmerge_restores_the_weight(shape, bias):
    wrapper, adapter = random_dora(shape, bias)
    base = wrapper.base_layer
    weight_before = base.weight.detach().clone()
    x = torch.randn(5, base.in_features)
    unmerged_out = wrapper(x)
    direction = weight_before + adapter.scaling * adapter.lora_B @ adapter.lora_A
    expected = (adapter.magnitude / torch.linalg.vector_norm(direction, dim=1))[:, None] * direction

    wrapper.merge()
    torch.testing.assert_close(base.weight, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wrapper(x), unmerged_out, rtol=1e-5, atol=1e-5)

    wrapper.unmerge()
    assert rel_err(base.weight, weight_before) < 1e-6
    assert adapter.merged_row_norm is None


def test_parameter_count_is_lora_plus_out():
    in_features, out_features = SHAPES["wide"]
    config = DoraConfig(target_modules=["layer"], rank=3)
    wrapper = add_adapter(make_linear(in_features, out_features), "dora", rank=3)
    counted = sum(p.numel() for p in wrapper.peft_adapters["default"].parameters())
    split = config.trainable_split(in_features, out_features)
    assert counted == split.total == 3 * (in_features + out_features) + out_features
    assert (split.inner, split.outer) == (3 * in_features, 3 * out_features + out_features)


def zero_row_dora(init_weights: bool = True):
    """DoRA on a weight whose rows 1 and 3 are zero (HF PEFT's regression case)."""
    base = make_linear(*SHAPES["tall"])
    with torch.no_grad():
        base.weight[[1, 3]] = 0.0
    wrapper = add_adapter(base, "dora", rank=4, alpha=8.0, init_weights=init_weights)
    return wrapper, wrapper.peft_adapters["default"]


def test_zero_rows_of_the_weight_give_finite_outputs_equal_to_the_base():
    wrapper, adapter = zero_row_dora()
    x = torch.randn(4, wrapper.in_features)
    output = wrapper(x)
    assert bool(torch.isfinite(output).all())
    torch.testing.assert_close(output, wrapper.base_layer(x), rtol=1e-6, atol=1e-6)
    assert float(adapter.magnitude.detach()[1]) == 0.0


def test_zero_rows_train_without_nan_and_merge_round_trips():
    wrapper, adapter = zero_row_dora(init_weights=False)
    x = torch.randn(6, wrapper.in_features)
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        wrapper(x).pow(2).mean().backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in adapter.parameters())
        optimizer.step()
    before = wrapper.base_layer.weight.detach().clone()
    output = wrapper(x)

    wrapper.merge()
    torch.testing.assert_close(wrapper(x), output, rtol=1e-5, atol=1e-5)
    wrapper.unmerge()

    assert bool(torch.isfinite(wrapper.base_layer.weight).all())
    assert rel_err(wrapper.base_layer.weight, before) < 1e-6


def test_rows_with_zero_magnitude_merge_to_zero_and_unmerge_to_the_kept_rows():
    wrapper, adapter = zero_row_dora()
    with torch.no_grad():
        adapter.lora_B.normal_()
    assert float(adapter.magnitude.detach()[[1, 3]].abs().sum()) == 0.0
    before = wrapper.base_layer.weight.detach().clone()

    wrapper.merge()
    assert not wrapper.base_layer.weight[[1, 3]].any()
    wrapper.unmerge()

    assert torch.equal(wrapper.base_layer.weight[[1, 3]], before[[1, 3]])
    assert rel_err(wrapper.base_layer.weight, before) < 1e-6
