"""Injection into a whole model: identity at start, exact reports, clean failures, switching,
merging and unloading, for every method."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ssvd_peft.config import PeftConfigError
from ssvd_peft.inject import (
    delete_adapter,
    inject_adapters,
    iter_adapter_layers,
    mark_only_adapters_trainable,
    merge_adapters,
    merge_and_unload,
    set_adapter,
    unload,
    unmerge_adapters,
)
from ssvd_peft.layers.base import AdapterLinear
from ssvd_peft.methods.hdmole_routing import attach_domain_router, merge_domain_experts
from ssvd_peft.registry import get_method

TARGETS = ["linear_q", "linear_k", "linear_v", "linear_out", "w_1", "w_2"]
METHODS = {
    "lora": ("lora", {"rank": 2, "alpha": 2.0}),
    "dora": ("dora", {"rank": 2, "alpha": 2.0}),
    "pissa": ("pissa", {"rank": 2, "alpha": 2.0}),
    "ssvd": ("ssvd", {"k": 4}),
    "ssvd_compat": ("ssvd", {"k": 4, "espnet_compat": True}),
    "ssvd_o": ("ssvd_o", {"k": 4, "outer_share": 0.5}),
    "ssvd_core": ("ssvd_core", {"k": 4}),
}


def inject(model: nn.Module, case: str, adapter_name: str = "default", **extra):
    method, options = METHODS[case]
    return inject_adapters(model, method, adapter_name, **{"target_modules": TARGETS, **options, **extra})


def targeted_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Linear layers (plain or wrapped) whose last name segment is in ``patterns``, in model order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | AdapterLinear) and name.rsplit(".", 1)[-1] in patterns
    ]


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything a failed call must leave as it was: module types, tensors, trainability."""
    return {
        "types": [(name, type(module)) for name, module in model.named_modules()],
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "trainable": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["trainable"] == before["trainable"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm(value - reference) / torch.linalg.norm(reference))


@pytest.mark.parametrize("case", [case for case in METHODS if case != "ssvd_compat"])
def test_every_method_wraps_the_targets_and_starts_as_the_identity(case, tiny_asr, asr_inputs):
    expected = tiny_asr(*asr_inputs)
    names = targeted_names(tiny_asr, TARGETS)
    inject(tiny_asr, case)
    assert [name for name, _ in iter_adapter_layers(tiny_asr)] == names
    torch.testing.assert_close(tiny_asr(*asr_inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", METHODS)
def test_report_lists_the_targets_in_model_order_with_their_parameter_counts(case, tiny_asr):
    names = targeted_names(tiny_asr, TARGETS)
    model_parameters = sum(p.numel() for p in tiny_asr.parameters())
    report = inject(tiny_asr, case)
    assert [module.name for module in report.modules] == names
    assert report.model_parameters == model_parameters
    for module in report.modules:
        layer = tiny_asr.get_submodule(module.name)
        assert (module.in_features, module.out_features) == (layer.in_features, layer.out_features)
        assert module.trainable == sum(p.numel() for p in layer.peft_adapters["default"].parameters())
    trainable = sum(p.numel() for p in tiny_asr.parameters() if p.requires_grad)
    assert report.trainable == trainable > 0


def test_excluded_modules_are_left_alone(tiny_asr):
    report = inject_adapters(tiny_asr, "lora", target_modules=TARGETS, exclude_modules=[r"decoder\..*"])
    wrapped = [name for name, _ in iter_adapter_layers(tiny_asr)]
    assert wrapped == [m.name for m in report.modules]
    assert wrapped == [name for name in targeted_names(tiny_asr, TARGETS) if name.startswith("encoder.")]
    assert len(wrapped) == 12


def test_module_overrides_change_the_matched_modules_only(tiny_asr):
    special = "encoder.encoders.0.feed_forward.w_1"
    inject_adapters(
        tiny_asr,
        "lora",
        "lora",
        target_modules=["w_1", "w_2"],
        rank=2,
        module_overrides={special: {"rank": 5}},
    )
    inject_adapters(
        tiny_asr, "ssvd", "ssvd", target_modules=["w_1", "w_2"], k=3, module_overrides={"w_2": {"k": 6}}
    )
    for name, layer in iter_adapter_layers(tiny_asr):
        assert layer.peft_adapters["lora"].lora_A.shape[0] == (5 if name == special else 2)
        assert layer.peft_adapters["ssvd"].ssvd_shift.numel() == (6 if name.endswith("w_2") else 3)


def test_a_pattern_that_matches_nothing_names_the_closest_modules(tiny_asr):
    before = snapshot(tiny_asr)
    with pytest.raises(PeftConfigError) as error:
        inject_adapters(tiny_asr, "lora", target_modules=["linear_q", "linear_qq"])
    message = str(error.value)
    assert "'linear_qq'" in message
    assert "linear_q" in message.split("Closest module names:")[1]
    assert_unchanged(tiny_asr, before)


def test_a_pattern_that_matches_only_other_modules_is_refused(tiny_asr):
    with pytest.raises(PeftConfigError, match=r"not nn\.Linear.*norm1 \(LayerNorm\)"):
        inject_adapters(tiny_asr, "lora", target_modules=["norm1"])
    with pytest.raises(PeftConfigError, match=r"self_attn \(TinyAttention\)"):
        inject_adapters(tiny_asr, "lora", target_modules=["linear_q", "self_attn"])
    assert list(iter_adapter_layers(tiny_asr)) == []


def test_a_regex_matching_containers_and_linears_adapts_only_the_linears(tiny_asr):
    report = inject_adapters(tiny_asr, "lora", target_modules=[r"encoder\.encoders\.1\..*"], rank=1)
    assert [m.name for m in report.modules] == targeted_names(tiny_asr, TARGETS)[6:12]


@pytest.mark.parametrize(("method", "option"), [("lora", "rank"), ("ssvd", "k"), ("ssvd_o", "k")])
def test_a_rank_too_large_for_one_layer_names_that_layer(method, option, tiny_asr):
    before = snapshot(tiny_asr)
    with pytest.raises(PeftConfigError) as error:
        inject_adapters(tiny_asr, method, target_modules=["w_1", "ctc_lo"], **{option: 12})
    message = str(error.value)
    assert "'ctc.ctc_lo'" in message
    assert "12" in message
    assert "w_1" not in message
    assert_unchanged(tiny_asr, before)


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attention(x, x, x)[0])


def test_multihead_attention_out_proj_is_refused():
    model = AttentionNet()
    before = snapshot(model)
    with pytest.raises(PeftConfigError, match=r"'attention\.out_proj'.*MultiheadAttention"):
        inject_adapters(model, "lora", target_modules=["proj", "out_proj"], rank=2)
    assert_unchanged(model, before)
    report = inject_adapters(model, "lora", target_modules=[".*proj"], exclude_modules=["out_proj"], rank=2)
    assert [m.name for m in report.modules] == ["proj"]


FAILURES = {
    "unmatched pattern": dict(target_modules=["linear_q", "w_1", "nothing_here"]),
    "rank too large for the last layer": dict(target_modules=["linear_q", "ctc_lo"], rank=12),
    "override too large for one layer": dict(
        target_modules=["linear_q", "w_2"],
        rank=2,
        module_overrides={r"decoder\.decoders\.1\..*": {"rank": 17}},
    ),
    "everything excluded": dict(target_modules=["linear_q"], exclude_modules=["linear_q"]),
    "exclude pattern matching no module": dict(target_modules=["linear_q"], exclude_modules=[r"decoder\."]),
    "non-linear target after linear ones": dict(target_modules=["linear_q", "after_norm"]),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failed_injection_leaves_the_model_exactly_as_it_was(failure, tiny_asr):
    before = snapshot(tiny_asr)
    with pytest.raises(PeftConfigError):
        inject_adapters(tiny_asr, "pissa", **FAILURES[failure])
    assert_unchanged(tiny_asr, before)
    assert not any(isinstance(module, AdapterLinear) for module in tiny_asr.modules())


def test_an_exclude_pattern_that_matches_no_module_is_refused_with_the_full_name_rule(tiny_asr):
    """A regex must match a whole module name: "decoder\\." matches none, so it would exclude nothing."""
    with pytest.raises(PeftConfigError, match=r"exclude pattern 'decoder\\\\.' matches no module.*decoder"):
        inject_adapters(tiny_asr, "lora", target_modules=["linear_q"], exclude_modules=[r"decoder\."])
    report = inject_adapters(tiny_asr, "lora", target_modules=["linear_q"], exclude_modules=["ctc_lo"])
    assert report.modules  # a pattern naming a module that is not a target is harmless


def test_a_failed_second_adapter_leaves_the_first_one_as_it_was(tiny_asr, asr_inputs):
    inject(tiny_asr, "lora", "accent", init_weights=False)
    expected = tiny_asr(*asr_inputs)
    before = snapshot(tiny_asr)
    with pytest.raises(PeftConfigError, match="already has an adapter named 'accent'"):
        inject(tiny_asr, "ssvd", "accent")
    with pytest.raises(PeftConfigError, match="rank 17"):
        inject_adapters(tiny_asr, "lora", "child", target_modules=["w_1", "w_2"], rank=17)
    assert_unchanged(tiny_asr, before)
    torch.testing.assert_close(tiny_asr(*asr_inputs), expected, rtol=0, atol=0)


def fail_on_third_layer(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Make the third adapter ``method`` builds fail, as a singular value decomposition can."""
    config_class = get_method(method).config
    build = config_class.build
    calls = []

    def failing(config, base_layer: nn.Linear) -> nn.Module:
        calls.append(base_layer)
        if len(calls) == 3:
            raise RuntimeError("linalg.svd: the algorithm failed to converge")
        return build(config, base_layer)

    monkeypatch.setattr(config_class, "build", failing)


@pytest.mark.parametrize("method", ["pissa", "ssvd_o"])
def test_an_error_while_building_an_adapter_undoes_the_layers_already_wrapped(method, tiny_asr, monkeypatch):
    fail_on_third_layer(monkeypatch, method)
    before = snapshot(tiny_asr)
    with pytest.raises(RuntimeError, match="failed to converge"):
        inject_adapters(tiny_asr, method, target_modules=TARGETS, init_weights=False)
    assert_unchanged(tiny_asr, before)
    assert not any(isinstance(module, AdapterLinear) for module in tiny_asr.modules())


def test_an_error_while_building_a_second_adapter_keeps_the_first_one_active(
    tiny_asr, asr_inputs, monkeypatch
):
    inject_adapters(tiny_asr, "lora", "accent", target_modules=TARGETS, rank=2, init_weights=False)
    mark_only_adapters_trainable(tiny_asr, modules_to_save=["ctc.ctc_lo"])
    expected = tiny_asr(*asr_inputs)
    before = snapshot(tiny_asr)
    fail_on_third_layer(monkeypatch, "ssvd")
    with pytest.raises(RuntimeError, match="failed to converge"):
        inject_adapters(tiny_asr, "ssvd", "child", target_modules=TARGETS, k=4)
    assert_unchanged(tiny_asr, before)
    for _, layer in iter_adapter_layers(tiny_asr):
        assert (list(layer.peft_adapters), layer.active_adapter) == (["accent"], "accent")
    torch.testing.assert_close(tiny_asr(*asr_inputs), expected, rtol=0, atol=0)


def test_a_non_finite_weight_fails_without_leaving_wrappers_behind(tiny_asr):
    with torch.no_grad():
        tiny_asr.decoder.decoders[1].feed_forward.w_2.weight[0, 0] = float("nan")
    types = [type(module) for module in tiny_asr.modules()]
    with pytest.raises(RuntimeError):
        inject_adapters(tiny_asr, "ssvd", target_modules=["w_1", "w_2"], k=4)
    assert [type(module) for module in tiny_asr.modules()] == types


def test_a_new_adapter_is_refused_on_a_layer_with_a_merged_adapter(tiny_asr, asr_inputs):
    inject_adapters(tiny_asr, "lora", "accent", target_modules=["w_1"], rank=2, init_weights=False)
    merge_adapters(tiny_asr)
    before = snapshot(tiny_asr)
    with pytest.raises(PeftConfigError, match=r"'accent' merged.*unmerge_adapters"):
        inject_adapters(tiny_asr, "dora", "child", target_modules=["w_1"], rank=2)
    assert_unchanged(tiny_asr, before)
    unmerge_adapters(tiny_asr)
    set_adapter(tiny_asr, None)
    expected = tiny_asr(*asr_inputs)
    inject_adapters(tiny_asr, "dora", "child", target_modules=["w_1"], rank=2)
    torch.testing.assert_close(tiny_asr(*asr_inputs), expected, rtol=1e-5, atol=1e-5)


def test_only_adapters_and_modules_to_save_stay_trainable(tiny_asr):
    inject(tiny_asr, "ssvd_o")
    mark_only_adapters_trainable(tiny_asr, modules_to_save=["ctc.ctc_lo"])
    trainable = {name for name, p in tiny_asr.named_parameters() if p.requires_grad}
    adapters = {name for name, _ in tiny_asr.named_parameters() if ".peft_adapters.default." in name}
    assert trainable == adapters | {"ctc.ctc_lo.weight", "ctc.ctc_lo.bias"}
    assert not any("base_layer" in name or "norm" in name for name in trainable)


def test_modules_to_save_must_match_a_module(tiny_asr):
    inject(tiny_asr, "lora")
    with pytest.raises(PeftConfigError, match=r"'ctc_low'.*ctc_lo"):
        mark_only_adapters_trainable(tiny_asr, modules_to_save=["ctc_low"])


@pytest.mark.parametrize("case", METHODS)
def test_gradients_and_optimizer_steps_reach_only_adapters_and_modules_to_save(case, tiny_asr, asr_inputs):
    inject(tiny_asr, case, init_weights=False)
    mark_only_adapters_trainable(tiny_asr, modules_to_save=["ctc.ctc_lo"])
    before = {name: p.detach().clone() for name, p in tiny_asr.named_parameters()}
    optimizer = torch.optim.SGD(tiny_asr.parameters(), lr=0.1)
    tiny_asr(*asr_inputs).pow(2).mean().backward()

    def should_learn(name: str) -> bool:
        return ".peft_adapters.default." in name or name.startswith("ctc.ctc_lo.")

    for name, parameter in tiny_asr.named_parameters():
        if should_learn(name) and parameter.numel() > 0:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        elif not should_learn(name):
            assert parameter.grad is None, name
    optimizer.step()
    for name, parameter in tiny_asr.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (should_learn(name) and parameter.numel() > 0), name


def test_named_adapters_share_layers_and_set_adapter_switches_outputs_and_training(tiny_asr, asr_inputs):
    layers = ["linear_q", "linear_v"]
    base = tiny_asr(*asr_inputs)
    inject_adapters(tiny_asr, "lora", "accent", target_modules=layers, rank=2, init_weights=False)
    accent = tiny_asr(*asr_inputs)
    report = inject_adapters(tiny_asr, "ssvd", "child", target_modules=layers, k=4, init_weights=False)
    child = tiny_asr(*asr_inputs)
    assert [m.name for m in report.modules] == targeted_names(tiny_asr, layers)
    for _, layer in iter_adapter_layers(tiny_asr):
        assert list(layer.peft_adapters) == ["accent", "child"]
        assert layer.active_adapter == "child"
    assert not torch.allclose(accent, base, atol=1e-4)
    assert not torch.allclose(child, accent, atol=1e-4)

    def trainable_adapters() -> set[str]:
        return {
            name.split(".peft_adapters.")[1].split(".")[0]
            for name, p in tiny_asr.named_parameters()
            if p.requires_grad
        }

    assert trainable_adapters() == {"child"}
    set_adapter(tiny_asr, "accent")
    torch.testing.assert_close(tiny_asr(*asr_inputs), accent)
    assert trainable_adapters() == {"accent"}
    set_adapter(tiny_asr, None)
    torch.testing.assert_close(tiny_asr(*asr_inputs), base)
    assert trainable_adapters() == set()
    set_adapter(tiny_asr, "child")
    torch.testing.assert_close(tiny_asr(*asr_inputs), child)
    assert trainable_adapters() == {"child"}
    with pytest.raises(KeyError, match="'teen'"):
        set_adapter(tiny_asr, "teen")


def test_switching_away_from_a_merged_adapter_unmerges_it_first(tiny_asr, asr_inputs):
    layers = ["linear_q", "linear_v"]
    base = tiny_asr(*asr_inputs)
    inject_adapters(tiny_asr, "lora", "accent", target_modules=layers, rank=2, alpha=2.0, init_weights=False)
    accent = tiny_asr(*asr_inputs)
    inject_adapters(tiny_asr, "ssvd_o", "child", target_modules=layers, k=4, init_weights=False)
    child = tiny_asr(*asr_inputs)
    merge_adapters(tiny_asr)
    torch.testing.assert_close(tiny_asr(*asr_inputs), child, rtol=1e-5, atol=1e-5)
    set_adapter(tiny_asr, "accent")
    torch.testing.assert_close(tiny_asr(*asr_inputs), accent, rtol=1e-5, atol=1e-5)
    merge_adapters(tiny_asr)
    set_adapter(tiny_asr, None)
    torch.testing.assert_close(tiny_asr(*asr_inputs), base, rtol=1e-5, atol=1e-5)


def test_set_adapter_only_touches_layers_that_have_it(tiny_asr, asr_inputs):
    inject_adapters(tiny_asr, "lora", "accent", target_modules=["w_1"], rank=2, init_weights=False)
    inject_adapters(tiny_asr, "lora", "child", target_modules=["w_2"], rank=2, init_weights=False)
    set_adapter(tiny_asr, "accent")
    for name, layer in iter_adapter_layers(tiny_asr):
        assert layer.active_adapter == ("accent" if name.endswith("w_1") else None)


def test_pissa_shares_a_layer_with_another_adapter(tiny_asr, asr_inputs):
    """PiSSA leaves W in the layer, so an adapter added after it (or before it) sees W itself."""
    plain = copy.deepcopy(tiny_asr)
    expected = plain(*asr_inputs)
    inject_adapters(tiny_asr, "pissa", "principal", target_modules=["w_1"], rank=2, init_weights=False)
    principal = tiny_asr(*asr_inputs)
    inject_adapters(tiny_asr, "lora", "other", target_modules=["w_1"], rank=2, init_weights=False)
    inject_adapters(plain, "lora", "other", target_modules=["w_1"], rank=2)
    state = tiny_asr.state_dict()
    plain.load_state_dict({key: state[key] for key in state if ".peft_adapters.other." in key}, strict=False)

    set_adapter(tiny_asr, "other")
    assert torch.equal(tiny_asr(*asr_inputs), plain(*asr_inputs)), "LoRA on W, not on a residual"
    set_adapter(tiny_asr, "principal")
    assert torch.equal(tiny_asr(*asr_inputs), principal)
    delete_adapter(tiny_asr, "other")
    assert torch.equal(tiny_asr(*asr_inputs), principal)
    delete_adapter(tiny_asr, "principal")
    assert torch.equal(tiny_asr(*asr_inputs), expected)


@pytest.mark.parametrize("case", METHODS)
def test_merge_then_unmerge_restores_the_weights_of_a_non_trivial_adapter(case, tiny_asr, asr_inputs):
    inject(tiny_asr, case, init_weights=False)
    adapted = tiny_asr(*asr_inputs)
    weights = {name: layer.weight.detach().clone() for name, layer in iter_adapter_layers(tiny_asr)}
    merge_adapters(tiny_asr)
    torch.testing.assert_close(tiny_asr(*asr_inputs), adapted, rtol=1e-5, atol=1e-5)
    for name, layer in iter_adapter_layers(tiny_asr):
        assert layer.merged_adapter == "default"
        assert relative_error(layer.weight, weights[name]) > 1e-3, name
    unmerge_adapters(tiny_asr)
    for name, layer in iter_adapter_layers(tiny_asr):
        assert layer.merged_adapter is None
        assert relative_error(layer.weight, weights[name]) < 1e-5, name
    torch.testing.assert_close(tiny_asr(*asr_inputs), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", METHODS)
def test_merge_and_unload_gives_plain_linears_with_the_adapted_outputs(case, tiny_asr, asr_inputs):
    plain_keys = set(tiny_asr.state_dict())
    inject(tiny_asr, case, init_weights=False)
    adapted = tiny_asr(*asr_inputs)
    merged = merge_and_unload(tiny_asr)
    assert not any(isinstance(module, AdapterLinear) for module in merged.modules())
    for name in targeted_names(merged, TARGETS):
        assert type(merged.get_submodule(name)) is nn.Linear
    assert set(merged.state_dict()) == plain_keys
    torch.testing.assert_close(merged(*asr_inputs), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", METHODS)
@pytest.mark.parametrize("merge", [False, True])
def test_unload_gives_back_the_original_model(case, merge, tiny_asr, asr_inputs):
    """Bit for bit, unless a merge was undone (W' - delta W rounds)."""
    original = copy.deepcopy(tiny_asr)
    expected = original(*asr_inputs)
    inject(tiny_asr, case, init_weights=False)
    if merge:
        merge_adapters(tiny_asr)
    restored = unload(tiny_asr)
    assert not any(isinstance(module, AdapterLinear) for module in restored.modules())
    assert [type(m) for m in restored.modules()] == [type(m) for m in original.modules()]
    reference = original.state_dict()
    if merge:
        for key, value in restored.state_dict().items():
            torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(restored(*asr_inputs), expected, rtol=1e-5, atol=1e-5)
        return
    for key, value in restored.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert torch.equal(restored(*asr_inputs), expected)


@pytest.mark.parametrize("case", ["lora", "pissa"])
def test_merge_and_unload_without_an_active_adapter_gives_back_the_base_model(case, tiny_asr, asr_inputs):
    expected = tiny_asr(*asr_inputs)
    inject(tiny_asr, case, init_weights=False)
    set_adapter(tiny_asr, None)
    plain = merge_and_unload(tiny_asr)
    assert not any(isinstance(module, AdapterLinear) for module in plain.modules())
    torch.testing.assert_close(plain(*asr_inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["lora", "dora", "ssvd", "ssvd_o"])
def test_a_wrapped_model_loads_a_plain_base_checkpoint(case, tiny_asr):
    checkpoint = copy.deepcopy(tiny_asr.state_dict())
    inject(tiny_asr, case)
    wrapped_keys = set(tiny_asr.state_dict())
    assert set(checkpoint) <= wrapped_keys
    adapter_keys = wrapped_keys - set(checkpoint)
    assert adapter_keys and all(".peft_adapters.default." in key for key in adapter_keys)
    for parameter in tiny_asr.parameters():
        parameter.data.zero_()
    result = tiny_asr.load_state_dict(checkpoint, strict=False)
    assert set(result.missing_keys) == adapter_keys
    assert result.unexpected_keys == []
    for name, layer in iter_adapter_layers(tiny_asr):
        assert torch.equal(layer.base_layer.weight, checkpoint[f"{name}.weight"])
        assert torch.equal(layer.base_layer.bias, checkpoint[f"{name}.bias"])


class _Routed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(self.norm(x))))


def _with_hooked_router() -> tuple[_Routed, dict[str, torch.Tensor]]:
    model = _Routed()
    base = {key: value.clone() for key, value in model.state_dict().items()}
    inject_adapters(model, "hdmole", target_modules=["up", "down"], rank=2, init_weights=False)
    attach_domain_router(model, feature_dim=8, source_module="norm")
    return model, base


@pytest.mark.parametrize("remove", ["unload", "delete_adapter", "merge_and_unload"])
def test_removing_an_hdmole_adapter_detaches_its_domain_router_and_hook(remove):
    model, base = _with_hooked_router()
    if remove == "unload":
        unload(model)
    elif remove == "delete_adapter":
        delete_adapter(model, "default")
    else:
        merge_domain_experts(model, 0)
        merge_and_unload(model)
    assert not hasattr(model, "peft_adapters")
    assert not model.norm._forward_pre_hooks
    assert model.state_dict().keys() == base.keys()
    model(torch.randn(2, 3, 8))
