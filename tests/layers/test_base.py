"""AdapterLinear: the shared wrapper's contract, checked for every method.

The base layer keeps its parameter names and stays frozen; without an active adapter the
wrapper is the base layer; named adapters switch; merge is exact and reversible.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from layer_builders import METHOD_OPTIONS, SHAPES, add_adapter, make_linear, rel_err
from torch import nn

from ssvd_peft.layers import AdapterLinear

METHODS = list(METHOD_OPTIONS)


def adapted(method: str, shape: str = "tall", bias: bool = True, **options) -> AdapterLinear:
    """A wrapped layer (weights of ``make_linear(..., seed=0)``) with one adapter of ``method``,
    non-trivial unless ``init_weights=True`` is passed."""
    in_features, out_features = SHAPES[shape]
    layer = make_linear(in_features, out_features, bias=bias)
    return add_adapter(layer, method, **{"init_weights": False, **METHOD_OPTIONS[method], **options})


def test_wrapping_needs_a_linear_layer():
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        AdapterLinear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_keeps_the_base_names(method):
    wrapper = adapted(method)
    keys = set(wrapper.state_dict())
    assert {"weight", "bias"} <= keys
    assert not any(key.startswith("base_layer.") for key in keys)
    assert all(key.startswith("peft_adapters.default.") for key in keys - {"weight", "bias"})


@pytest.mark.parametrize("method", METHODS)
def test_plain_linear_checkpoint_loads_into_the_wrapper(method):
    model = nn.Sequential(OrderedDict(fc=adapted(method, init_weights=True)))
    plain = nn.Sequential(OrderedDict(fc=make_linear(*SHAPES["tall"], seed=7)))

    result = model.load_state_dict(plain.state_dict(), strict=False)

    assert result.unexpected_keys == []
    assert result.missing_keys, "the adapter's own tensors are not in a base checkpoint"
    assert all(key.startswith("fc.peft_adapters.default.") for key in result.missing_keys)
    for name in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(model.state_dict()[name], plain.state_dict()[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.fc.base_layer.bias, plain.fc.bias, rtol=0, atol=0)
    torch.testing.assert_close(model.fc.base_layer.weight, plain.fc.weight, rtol=0, atol=0)
    if method in ("lora", "pissa", "ssvd", "ssvd_o"):  # their identity start does not depend on W
        x = torch.randn(4, SHAPES["tall"][0])
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_wrapper_base_keys_load_strictly_into_a_plain_linear(method):
    original = make_linear(*SHAPES["tall"])
    model = nn.Sequential(OrderedDict(fc=adapted(method)))
    state = {key: value for key, value in model.state_dict().items() if ".peft_adapters." not in key}
    assert set(state) == {"fc.weight", "fc.bias"}

    plain = nn.Sequential(OrderedDict(fc=nn.Linear(*SHAPES["tall"])))
    plain.load_state_dict(state, strict=True)

    torch.testing.assert_close(plain.fc.weight, original.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain.fc.bias, original.bias, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_base_layer_is_frozen_and_the_adapter_trainable(method):
    wrapper = adapted(method)
    assert not wrapper.base_layer.weight.requires_grad
    assert not wrapper.base_layer.bias.requires_grad
    adapter_params = list(wrapper.peft_adapters["default"].parameters())
    assert adapter_params and all(p.requires_grad for p in adapter_params)
    assert wrapper.weight is wrapper.base_layer.weight
    assert wrapper.bias is wrapper.base_layer.bias


@pytest.mark.parametrize("method", METHODS)
def test_no_active_adapter_gives_the_base_output(method):
    wrapper = adapted(method)
    x = torch.randn(5, wrapper.in_features)
    base_out = wrapper.base_layer(x)
    assert rel_err(wrapper(x), base_out) > 1e-3, "the random adapter must change the output"

    wrapper.set_adapter(None)

    torch.testing.assert_close(wrapper(x), base_out, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no active adapter"):
        wrapper.delta_weight()


@pytest.mark.parametrize("method", ["lora", "dora", "ssvd", "ssvd_o"])
def test_named_adapters_switch_the_output(method):
    wrapper = add_adapter(
        make_linear(*SHAPES["tall"]), method, "first", init_weights=False, **METHOD_OPTIONS[method]
    )
    add_adapter(wrapper, method, "second", init_weights=False, **METHOD_OPTIONS[method])
    x = torch.randn(5, wrapper.in_features)
    base = wrapper.base_layer

    def expected(name: str) -> torch.Tensor:
        return nn.functional.linear(x, base.weight + wrapper.delta_weight(name), base.bias)

    assert wrapper.active_adapter == "second"
    torch.testing.assert_close(wrapper(x), expected("second"), rtol=1e-5, atol=1e-5)
    wrapper.set_adapter("first")
    torch.testing.assert_close(wrapper(x), expected("first"), rtol=1e-5, atol=1e-5)
    assert rel_err(expected("first"), expected("second")) > 1e-3
    with pytest.raises(KeyError, match="third"):
        wrapper.set_adapter("third")
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(wrapper, method, "first")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_equals_the_effective_weight(method, shape):
    wrapper = adapted(method, shape)
    x = torch.randn(3, 7, wrapper.in_features)
    base = wrapper.base_layer
    expected = nn.functional.linear(x, base.weight + wrapper.delta_weight(), base.bias)
    torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_merge_keeps_the_output_and_unmerge_restores_the_weight(method, shape, bias):
    wrapper = adapted(method, shape, bias)
    x = torch.randn(6, wrapper.in_features)
    weight_before = wrapper.base_layer.weight.detach().clone()
    unmerged_out = wrapper(x)

    wrapper.merge()
    assert wrapper.merged_adapter == "default"
    assert rel_err(wrapper.base_layer.weight, weight_before) > 1e-3
    torch.testing.assert_close(wrapper(x), unmerged_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wrapper(x), wrapper.base_layer(x), rtol=0, atol=0)

    wrapper.unmerge()
    assert wrapper.merged_adapter is None
    assert rel_err(wrapper.base_layer.weight, weight_before) < 1e-5
    torch.testing.assert_close(wrapper(x), unmerged_out, rtol=1e-5, atol=1e-5)


def test_switching_adapters_unmerges_the_merged_one():
    wrapper = add_adapter(make_linear(*SHAPES["tall"]), "lora", "first", init_weights=False, rank=4)
    add_adapter(wrapper, "lora", "second", init_weights=False, rank=4)
    weight_before = wrapper.base_layer.weight.detach().clone()
    x = torch.randn(4, wrapper.in_features)

    wrapper.merge()
    wrapper.set_adapter("first")

    assert wrapper.merged_adapter is None
    assert rel_err(wrapper.base_layer.weight, weight_before) < 1e-6
    expected = nn.functional.linear(x, weight_before + wrapper.delta_weight("first"), wrapper.base_layer.bias)
    torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "ssvd", "ssvd_o"])
def test_deleting_a_merged_adapter_restores_the_base_layer(method):
    wrapper = adapted(method)
    weight_before = wrapper.base_layer.weight.detach().clone()
    wrapper.merge()

    wrapper.delete_adapter("default")

    assert wrapper.active_adapter is None and "default" not in wrapper.peft_adapters
    assert rel_err(wrapper.base_layer.weight, weight_before) < 1e-5
