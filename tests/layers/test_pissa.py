"""PiSSA: LoRA whose factors start as the top-r singular part of W, on the residual weight.

    A = diag(sqrt(s_r / scale)) V_r^T,  B = U_r diag(sqrt(s_r / scale)),  W_res = W - scale B A.

Checked against HF PEFT 0.21's ``init_lora_weights="pissa"`` (factors up to the sign of each
singular pair), the rank-2r export on the original weight, and the release of the base layer.
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
def test_identity_at_init(shape, bias):
    wrapper, _, original = pissa_layer(shape, bias)
    base = wrapper.base_layer
    x = torch.randn(2, 5, base.in_features)
    torch.testing.assert_close(wrapper(x), F.linear(x, original, base.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_init_equals_hf_peft_pissa(shape, use_rslora):
    base = make_linear(*SHAPES[shape])
    hf = hf_lora_layer(base, r=4, lora_alpha=8, use_rslora=use_rslora, init_lora_weights="pissa")
    wrapper, adapter, original = pissa_layer(shape, use_rslora=use_rslora)
    hf_a, hf_b = hf.lora_A["default"].weight, hf.lora_B["default"].weight

    signs = torch.sign((adapter.lora_A * hf_a).sum(dim=1))  # one sign per singular pair
    torch.testing.assert_close(adapter.lora_A, signs[:, None] * hf_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter.lora_B, hf_b * signs[None, :], rtol=1e-4, atol=1e-5)
    assert rel_err(adapter.delta_weight(wrapper.base_layer.weight), hf.get_delta_weight("default")) < 1e-5
    assert rel_err(wrapper.base_layer.weight, hf.base_layer.weight) < 1e-5
    assert rel_err(wrapper.base_layer.weight, original) > 1e-2, "the base now holds the residual"
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
    layers = []
    for method in ("full", "randomized"):
        base = make_linear(in_features, out_features)
        with torch.no_grad():
            base.weight.copy_(weight)
        layers.append(add_adapter(base, "pissa", rank=4, svd_method=method, svd_niter=4))
    full, randomized = layers
    x = torch.randn(5, in_features)

    assert calls == [{"q": 4, "niter": 4}]

    assert rel_err(randomized.delta_weight(), full.delta_weight()) < 1e-4
    torch.testing.assert_close(
        randomized(x), F.linear(x, weight, randomized.base_layer.bias), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("bias", [True, False])
def test_rank_2r_export_on_the_original_weight_reproduces_the_trained_layer(shape, bias):
    wrapper, adapter, original = pissa_layer(shape, bias)
    wrapper(torch.randn(8, wrapper.in_features)).pow(2).sum().backward()
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter -= 0.05 * parameter.grad
    lora_a, lora_b = adapter.as_lora_factors()
    x = torch.randn(6, wrapper.in_features)

    assert lora_a.shape == (8, wrapper.in_features) and lora_b.shape == (wrapper.out_features, 8)
    exported = F.linear(x, original, wrapper.base_layer.bias) + adapter.scaling * x @ lora_a.T @ lora_b.T
    assert rel_err(wrapper(x), F.linear(x, original, wrapper.base_layer.bias)) > 1e-3, "trained"
    torch.testing.assert_close(exported, wrapper(x), rtol=1e-5, atol=1e-5)


def test_init_weights_false_perturbs_the_factors_not_the_residual():
    wrapper, adapter, original = pissa_layer(init_weights=False)
    residual = original - adapter.scaling * adapter.initial_B @ adapter.initial_A
    torch.testing.assert_close(wrapper.base_layer.weight, residual, rtol=0, atol=0)
    assert rel_err(adapter.lora_A, adapter.initial_A) > 1e-2
    assert rel_err(adapter.lora_B, adapter.initial_B) > 1e-2


@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("merge", [False, True])
def test_release_restores_the_original_weight(init_weights, merge):
    wrapper, _, original = pissa_layer(init_weights=init_weights)
    if merge:
        wrapper.merge()

    wrapper.delete_adapter("default")

    assert rel_err(wrapper.base_layer.weight, original) < 1e-6
    x = torch.randn(3, wrapper.in_features)
    torch.testing.assert_close(
        wrapper(x), F.linear(x, original, wrapper.base_layer.bias), rtol=1e-5, atol=1e-5
    )


def test_only_the_factors_train():
    wrapper, adapter, _ = pissa_layer()
    assert {name for name, p in wrapper.named_parameters() if p.requires_grad} == {
        "peft_adapters.default.lora_A",
        "peft_adapters.default.lora_B",
    }
    assert not adapter.initial_A.requires_grad and not adapter.initial_B.requires_grad
    assert adapter.rewrites_base


def test_parameter_count_is_r_times_in_plus_out():
    in_features, out_features = SHAPES["tall"]
    config = PissaConfig(target_modules=["layer"], rank=4)
    _, adapter, _ = pissa_layer(rank=4)
    counted = sum(p.numel() for p in adapter.parameters())
    assert counted == config.trainable_split(in_features, out_features).total
    assert counted == 4 * (in_features + out_features)


def restore_cases(wrapper) -> None:
    """Merge and unmerge (recomputes W_res), then nothing else: the state the restores start from."""
    wrapper.merge()
    wrapper.unmerge()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("init_weights", [True, False])
def test_restores_give_back_the_original_weight_bit_for_bit(shape, init_weights):
    """W_res + scale B0 A0 rounds differently from W in some entries; the kept W does not."""
    base = make_linear(*SHAPES[shape])
    with torch.no_grad():
        base.weight.mul_(torch.logspace(-3, 2, base.weight.numel()).reshape(base.weight.shape))
    original = base.weight.detach().clone()
    wrapper = add_adapter(base, "pissa", rank=6, alpha=3.0, init_weights=init_weights)
    adapter = wrapper.peft_adapters["default"]
    recomputed = wrapper.base_layer.weight + adapter.scaling * adapter.initial_B @ adapter.initial_A
    assert not torch.equal(recomputed, original), "this weight would not survive W_res + scale B0 A0"

    assert torch.equal(wrapper.state_dict()["weight"], original)
    residual = wrapper.base_layer.weight.detach().clone()
    restore_cases(wrapper)
    assert torch.equal(wrapper.base_layer.weight, residual), "unmerge rebuilds W_res exactly"
    wrapper.merge()
    assert torch.equal(wrapper.state_dict()["weight"], original), "merged, the state dict still holds W"
    wrapper.delete_adapter("default")
    assert torch.equal(wrapper.base_layer.weight, original)


def test_loading_a_state_dict_rebuilds_the_residual_from_the_loaded_weight_and_factors():
    wrapper, adapter, original = pissa_layer(init_weights=False)
    state = {key: value.clone() for key, value in wrapper.state_dict().items()}
    other, other_adapter, _ = pissa_layer(init_weights=True, svd_method="randomized")
    with torch.no_grad():
        other.base_layer.weight.add_(1.0)

    other.load_state_dict(state)

    assert torch.equal(other_adapter.initial_A, adapter.initial_A)
    assert torch.equal(other.base_layer.weight, wrapper.base_layer.weight)
    assert torch.equal(other.state_dict()["weight"], original)
    x = torch.randn(3, wrapper.in_features)
    assert torch.equal(other(x), wrapper(x))


def test_loading_into_a_merged_layer_is_refused():
    wrapper, _, _ = pissa_layer()
    state = wrapper.state_dict()
    wrapper.merge()
    with pytest.raises(RuntimeError, match="is merged into its weight; call unmerge_adapters"):
        wrapper.load_state_dict(state)


def test_the_kept_original_stays_out_of_buffers_and_state_dict():
    """DistributedDataParallel broadcasts buffers every step: the copy of W is not one."""
    wrapper, adapter, _ = pissa_layer()
    assert all(buffer is not adapter.original_weight for buffer in wrapper.buffers())
    assert {key for key in wrapper.state_dict() if "original" in key} == set()
    assert adapter.original_weight.device.type == "cpu"
