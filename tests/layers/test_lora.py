"""LoRA: y = x W^T + b + scale (dropout(x) A^T) B^T, scale = alpha / r (alpha / sqrt(r): rsLoRA).

Checked against HF PEFT 0.21's LoRA layer holding the same factors.
"""

from __future__ import annotations

import math

import pytest
import torch
from layer_builders import SHAPES, add_adapter, hf_lora_layer, make_linear, rel_err
from torch import nn

from ssvd_peft.layers import LoraAdapter
from ssvd_peft.methods.lora import LoraConfig


def copy_factors_from_hf(adapter: LoraAdapter, hf_layer: nn.Module) -> None:
    with torch.no_grad():
        adapter.lora_A.copy_(hf_layer.lora_A["default"].weight)
        adapter.lora_B.copy_(hf_layer.lora_B["default"].weight)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_identity_at_init(shape, bias):
    base = make_linear(*SHAPES[shape], bias=bias)
    wrapper = add_adapter(base, "lora", rank=4, alpha=8.0)
    x = torch.randn(2, 5, base.in_features)
    torch.testing.assert_close(wrapper(x), base(x), rtol=0, atol=0)


def test_init_is_kaiming_uniform_a_and_zero_b():
    wrapper = add_adapter(make_linear(64, 32), "lora", rank=8)
    adapter = wrapper.peft_adapters["default"]
    bound = 1.0 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in = in_features
    largest = float(adapter.lora_A.detach().abs().max())
    assert 0.8 * bound < largest <= bound
    assert torch.count_nonzero(adapter.lora_B) == 0


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_equals_hf_peft_for_the_same_factors(shape, bias, use_rslora):
    base = make_linear(*SHAPES[shape], bias=bias)
    hf = hf_lora_layer(base, r=4, lora_alpha=6, use_rslora=use_rslora, init_lora_weights=False)
    wrapper = add_adapter(base, "lora", rank=4, alpha=6.0, use_rslora=use_rslora).eval()
    adapter = wrapper.peft_adapters["default"]
    copy_factors_from_hf(adapter, hf)
    x = torch.randn(3, 5, base.in_features)

    assert adapter.scaling == pytest.approx(hf.scaling["default"])
    assert adapter.scaling == pytest.approx(6.0 / (math.sqrt(4) if use_rslora else 4))
    assert rel_err(hf(x), base(x)) > 1e-2, "the compared adapters must be non-trivial"
    torch.testing.assert_close(wrapper(x), hf(x), rtol=1e-5, atol=1e-5)


def test_dropout_acts_on_the_adapter_input_like_hf_peft():
    base = make_linear(*SHAPES["tall"])
    hf = hf_lora_layer(base, r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False).train()
    wrapper = add_adapter(base, "lora", rank=4, alpha=8.0, dropout=0.5).train()
    copy_factors_from_hf(wrapper.peft_adapters["default"], hf)
    x = torch.randn(6, base.in_features)

    torch.manual_seed(5)
    ours = wrapper(x)
    torch.manual_seed(5)
    theirs = hf(x)

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert rel_err(ours, wrapper.eval()(x)) > 1e-3, "dropout is active in training"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_merged_weight_equals_hf_peft_merge(shape):
    base = make_linear(*SHAPES[shape])
    hf = hf_lora_layer(base, r=4, lora_alpha=8, init_lora_weights=False)
    wrapper = add_adapter(base, "lora", rank=4, alpha=8.0)
    copy_factors_from_hf(wrapper.peft_adapters["default"], hf)

    wrapper.merge()
    hf.merge()

    torch.testing.assert_close(wrapper.base_layer.weight, hf.base_layer.weight, rtol=1e-5, atol=1e-6)


def test_delta_weight_is_scaled_b_times_a():
    wrapper = add_adapter(make_linear(*SHAPES["wide"]), "lora", rank=3, alpha=5.0, init_weights=False)
    adapter = wrapper.peft_adapters["default"]
    torch.testing.assert_close(wrapper.delta_weight(), (5.0 / 3) * adapter.lora_B @ adapter.lora_A)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_parameter_count_is_r_times_in_plus_out(shape):
    in_features, out_features = SHAPES[shape]
    config = LoraConfig(target_modules=["layer"], rank=5)
    wrapper = add_adapter(make_linear(in_features, out_features), "lora", rank=5)
    counted = sum(p.numel() for p in wrapper.peft_adapters["default"].parameters())
    split = config.trainable_split(in_features, out_features)
    assert counted == split.total == 5 * (in_features + out_features)
    assert (split.inner, split.outer, split.values) == (5 * in_features, 5 * out_features, 0)


def test_gradients_reach_only_the_factors():
    wrapper = add_adapter(make_linear(*SHAPES["tall"]), "lora", rank=4, init_weights=False)
    wrapper(torch.randn(4, wrapper.in_features)).pow(2).sum().backward()
    assert wrapper.base_layer.weight.grad is None and wrapper.base_layer.bias.grad is None
    adapter = wrapper.peft_adapters["default"]
    assert adapter.lora_A.grad.abs().sum() > 0 and adapter.lora_B.grad.abs().sum() > 0


def test_rank_larger_than_the_layer_is_refused():
    with pytest.raises(
        ValueError, match=r"rank 13 is larger than this layer allows \(min\(in=12, out=20\) = 12\)"
    ):
        add_adapter(make_linear(12, 20), "lora", rank=13)
