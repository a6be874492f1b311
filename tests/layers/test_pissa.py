"""PiSSA: LoRA whose factors start as the top-r singular part of W, minus that frozen part.

    A0 = diag(sqrt(s_r / scale)) V_r^T,  B0 = U_r diag(sqrt(s_r / scale)),
    y = x W^T + b + scale ((x A^T) B^T - (x A0^T) B0^T)   (LoRA on W_res = W - scale B0 A0).

Checked against HF PEFT 0.21's ``init_lora_weights="pissa"`` (factors up to the sign of each
singular pair, the layer before and after a step), the untouched base weight and the reload.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_builders import SHAPES, add_adapter, hf_lora_layer, make_linear, rel_err

from ssvd_peft.methods.pissa import PissaConfig


def pissa_layer(shape: str = "tall", bias: bool = True, **options):
    base = make_linear(*SHAPES[shape], bias=bias)
    original = base.weight.detach().clone()
    wrapper = add_adapter(base, "pissa", **{"rank": 4, "alpha": 8.0, **options})
    return wrapper, wrapper.peft_adapters["default"], original


def decaying_weight(in_features: int, out_features: int) -> torch.Tensor:
    """A weight with singular values 4^0, 4^-1, ...: a clear principal subspace."""
    m = min(in_features, out_features)
    u, _ = torch.linalg.qr(torch.randn(out_features, m))
    v, _ = torch.linalg.qr(torch.randn(in_features, m))
    return u @ torch.diag(4.0 ** -torch.arange(m, dtype=torch.float32)) @ v.T


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_the_layer_starts_as_the_base_layer_bit_for_bit(shape, bias):
    """The trainable and the frozen paths are the same numbers at first: their difference is 0."""
    wrapper, adapter, original = pissa_layer(shape, bias)
    base = wrapper.base_layer
    x = torch.randn(2, 5, base.in_features)
    assert torch.equal(wrapper(x), F.linear(x, original, base.bias))
    assert torch.equal(adapter.delta_weight(base.weight), torch.zeros_like(original))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_init_and_a_step_equal_hf_peft_pissa(shape, use_rslora):
    base = make_linear(*SHAPES[shape])
    hf = hf_lora_layer(base, r=4, lora_alpha=8, use_rslora=use_rslora, init_lora_weights="pissa")
    wrapper, adapter, original = pissa_layer(shape, use_rslora=use_rslora)
    hf_a, hf_b = hf.lora_A["default"].weight, hf.lora_B["default"].weight

    signs = torch.sign((adapter.lora_A * hf_a).sum(dim=1))  # one sign per singular pair
    torch.testing.assert_close(adapter.lora_A, signs[:, None] * hf_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter.lora_B, hf_b * signs[None, :], rtol=1e-4, atol=1e-5)
    assert torch.equal(wrapper.base_layer.weight, original), "W is kept, not replaced by W_res"
    principal = adapter.scaling * adapter.initial_B @ adapter.initial_A
    assert rel_err(original - principal, hf.base_layer.weight) < 1e-5, "the same residual W_res"
    x = torch.randn(4, base.in_features)
    torch.testing.assert_close(wrapper(x), hf(x), rtol=1e-5, atol=1e-5)

    before_step = hf(x)
    step_a, step_b = 0.1 * torch.randn_like(hf_a), 0.1 * torch.randn_like(hf_b)
    with torch.no_grad():
        hf_a += step_a
        hf_b += step_b
        adapter.lora_A += signs[:, None] * step_a
        adapter.lora_B += step_b * signs[None, :]
    assert rel_err(hf(x), before_step) > 1e-3, "the update changes the layer"
    torch.testing.assert_close(wrapper(x), hf(x), rtol=1e-5, atol=1e-5)
    adapted = original + adapter.delta_weight(original)
    assert rel_err(adapted, hf.base_layer.weight + hf.get_delta_weight("default")) < 1e-5


def test_factors_are_the_top_singular_triplets():
    _, adapter, original = pissa_layer("wide", rank=3, alpha=6.0)
    u, s, vh = torch.linalg.svd(original.double(), full_matrices=False)
    product = (adapter.scaling * adapter.lora_B @ adapter.lora_A).double()
    torch.testing.assert_close(product, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=1e-5, atol=1e-5)
    norms_a = torch.linalg.vector_norm(adapter.lora_A.double(), dim=1)
    norms_b = torch.linalg.vector_norm(adapter.lora_B.double(), dim=0)
    torch.testing.assert_close(norms_a, torch.sqrt(s[:3] / adapter.scaling), rtol=1e-5, atol=0)
    torch.testing.assert_close(norms_b, torch.sqrt(s[:3] / adapter.scaling), rtol=1e-5, atol=0)


def test_randomized_svd_runs_and_approximates_the_full_one(monkeypatch):
    calls = []
    svd_lowrank = torch.svd_lowrank
    monkeypatch.setattr(
        torch, "svd_lowrank", lambda *args, **kw: calls.append(kw) or svd_lowrank(*args, **kw)
    )
    in_features, out_features = 48, 40
    weight = decaying_weight(in_features, out_features)
    principal = {}
    for method in ("full", "randomized"):
        base = make_linear(in_features, out_features)
        with torch.no_grad():
            base.weight.copy_(weight)
        adapter = add_adapter(base, "pissa", rank=4, svd_method=method, svd_niter=4).peft_adapters["default"]
        principal[method] = adapter.initial_B @ adapter.initial_A

    assert calls == [{"q": 4, "niter": 4}]
    assert rel_err(principal["randomized"], principal["full"]) < 1e-4


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_delta_weight_on_the_original_weight_reproduces_the_trained_layer(shape, bias):
    wrapper, adapter, original = pissa_layer(shape, bias)
    wrapper(torch.randn(8, wrapper.in_features)).pow(2).sum().backward()
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter -= 0.05 * parameter.grad
    x = torch.randn(6, wrapper.in_features)
    bias_term = wrapper.base_layer.bias

    assert rel_err(wrapper(x), F.linear(x, original, bias_term)) > 1e-3, "trained"
    dense = F.linear(x, original + adapter.delta_weight(original), bias_term)
    # The two low-rank paths are of the size of W's top singular values and cancel in float32.
    torch.testing.assert_close(dense, wrapper(x), rtol=1e-4, atol=1e-4)
    wrapper.merge()
    torch.testing.assert_close(wrapper(x), dense, rtol=1e-5, atol=1e-5)


def test_the_frozen_path_takes_no_dropout():
    """W_res = W - scale B0 A0 sees x itself; only the trainable path sees dropout(x)."""
    wrapper, adapter, original = pissa_layer(dropout=0.9)
    wrapper.train()
    x = torch.randn(64, wrapper.in_features)
    torch.manual_seed(0)
    expected = F.linear(x, original, wrapper.base_layer.bias) + adapter.scaling * (
        F.linear(F.linear(F.dropout(x, 0.9), adapter.lora_A), adapter.lora_B)
        - F.linear(F.linear(x, adapter.initial_A), adapter.initial_B)
    )
    torch.manual_seed(0)
    torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-5)


def test_init_weights_false_perturbs_the_factors_not_the_base_weight():
    wrapper, adapter, original = pissa_layer(init_weights=False)
    assert torch.equal(wrapper.base_layer.weight, original)
    assert rel_err(adapter.lora_A, adapter.initial_A) > 1e-2
    assert rel_err(adapter.lora_B, adapter.initial_B) > 1e-2


@pytest.mark.parametrize("init_weights", [True, False])
def test_the_base_weight_is_never_written(init_weights):
    """Creation, training and deletion leave W as it was, bit for bit (merge rounds, as LoRA's)."""
    base = make_linear(*SHAPES["tall"])
    storage, original = base.weight.data_ptr(), base.weight.detach().clone()
    wrapper = add_adapter(base, "pissa", rank=4, init_weights=init_weights)
    wrapper(torch.randn(3, wrapper.in_features)).sum().backward()

    assert wrapper.base_layer.weight.data_ptr() == storage
    assert torch.equal(wrapper.base_layer.weight, original)
    assert torch.equal(wrapper.state_dict()["weight"], original)
    wrapper.merge()
    torch.testing.assert_close(wrapper.state_dict()["weight"], original, rtol=1e-6, atol=1e-6)
    wrapper.delete_adapter("default")
    torch.testing.assert_close(wrapper.base_layer.weight, original, rtol=1e-6, atol=1e-6)


def test_the_adapter_holds_no_copy_of_the_weight():
    """Two factor pairs, r (in + out) numbers each: nothing of size in x out (memory at scale)."""
    _, adapter, _ = pissa_layer(rank=4)
    in_features, out_features = SHAPES["tall"]
    held = [*adapter.parameters(), *adapter.buffers()]
    assert sum(t.numel() for t in held) == 2 * 4 * (in_features + out_features)
    tensors = [value for value in vars(adapter).values() if isinstance(value, torch.Tensor)]
    assert tensors == [], "no tensor outside the parameters and buffers"


def test_only_the_factors_train():
    wrapper, adapter, _ = pissa_layer()
    assert {name for name, p in wrapper.named_parameters() if p.requires_grad} == {
        "peft_adapters.default.lora_A",
        "peft_adapters.default.lora_B",
    }
    assert not adapter.initial_A.requires_grad and not adapter.initial_B.requires_grad


def test_parameter_count_is_r_times_in_plus_out():
    in_features, out_features = SHAPES["tall"]
    config = PissaConfig(target_modules=["layer"], rank=4)
    _, adapter, _ = pissa_layer(rank=4)
    counted = sum(p.numel() for p in adapter.parameters())
    assert counted == config.trainable_split(in_features, out_features).total
    assert counted == 4 * (in_features + out_features)


def test_loading_a_state_dict_takes_the_loaded_weight_and_factors():
    wrapper, adapter, original = pissa_layer(init_weights=False)
    state = {key: value.clone() for key, value in wrapper.state_dict().items()}
    other, other_adapter, _ = pissa_layer(init_weights=True, svd_method="randomized")
    with torch.no_grad():
        other.base_layer.weight.add_(1.0)

    other.load_state_dict(state)

    assert torch.equal(other_adapter.initial_A, adapter.initial_A)
    assert torch.equal(other.base_layer.weight, original)
    x = torch.randn(3, wrapper.in_features)
    assert torch.equal(other(x), wrapper(x))


def test_loading_into_a_merged_layer_is_refused():
    wrapper, _, _ = pissa_layer()
    state = wrapper.state_dict()
    wrapper.merge()
    with pytest.raises(RuntimeError, match="is merged into its weight; call unmerge_adapters"):
        wrapper.load_state_dict(state)
