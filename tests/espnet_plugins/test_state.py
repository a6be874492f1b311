"""Adapter-only model files in ESPnet's flat state-dict format, and loading them back."""

from __future__ import annotations

import copy

import pytest
import torch

from espnet_plugins.state import keep_adapter_entries
from ssvd_peft.adapter_state import (
    FINGERPRINT,
    AdapterCheckpointError,
    is_adapter_entry,
    load_adapter_entries,
)
from ssvd_peft.inject import inject_adapters, iter_adapter_layers, merge_and_unload

TARGETS = ["linear_q", "linear_v", "w_1"]


def adapted(model: torch.nn.Module, init_weights: bool = False) -> torch.nn.Module:
    inject_adapters(model, "ssvd_o", target_modules=TARGETS, k_ratio=0.5, init_weights=init_weights)
    keep_adapter_entries(model, ["ctc.ctc_lo"])
    return model


def test_is_adapter_entry_covers_adapter_tensors_and_modules_to_save() -> None:
    assert is_adapter_entry("encoder.encoders.0.self_attn.linear_q.peft_adapters.default.ssvd_shift", [])
    assert is_adapter_entry("ctc.ctc_lo.weight", ["ctc.ctc_lo"])
    assert is_adapter_entry("ctc.ctc_lo.bias", ["ctc"])
    assert not is_adapter_entry("ctc.ctc_lo.weight", [])
    assert not is_adapter_entry("encoder.encoders.0.self_attn.linear_q.weight", ["ctc.ctc_lo"])


def test_state_dict_holds_adapters_modules_to_save_and_fingerprints_only(tiny_asr) -> None:
    model = adapted(tiny_asr)
    state = model.state_dict()
    layers = [name for name, _ in iter_adapter_layers(model)]
    expected = {
        f"{name}.peft_adapters.default.{p}"
        for name in layers
        for p in ("ssvd_shift", "ssvd_inner", "ssvd_outer")
    }
    expected |= {f"{name}.{FINGERPRINT}" for name in layers} | {"ctc.ctc_lo.weight", "ctc.ctc_lo.bias"}
    assert set(state) == expected
    assert all(state[f"{name}.{FINGERPRINT}"].dtype == torch.float64 for name in layers)


def test_state_dict_is_complete_again_after_merge_and_unload(tiny_asr) -> None:
    plain_keys = set(copy.deepcopy(tiny_asr).state_dict())
    model = merge_and_unload(adapted(tiny_asr))
    assert set(model.state_dict()) == plain_keys


def test_loading_the_entries_into_a_fresh_base_model_restores_the_adapted_model(tiny_asr, asr_inputs) -> None:
    base = copy.deepcopy(tiny_asr)
    model = adapted(tiny_asr)
    with torch.no_grad():
        model.ctc.ctc_lo.weight.add_(0.5)
    expected = model(*asr_inputs)
    restored = adapted(base, init_weights=True)
    assert not torch.allclose(restored(*asr_inputs), expected)
    load_adapter_entries(restored, model.state_dict(), ["ctc.ctc_lo"], "adapter.pth")
    torch.testing.assert_close(restored(*asr_inputs), expected)


def test_loading_refuses_a_file_of_another_base_model(tiny_asr) -> None:
    other = copy.deepcopy(tiny_asr)
    with torch.no_grad():
        other.encoder.encoders[0].self_attn.linear_q.weight.mul_(1.5)
    state = adapted(tiny_asr).state_dict()
    with pytest.raises(AdapterCheckpointError, match="another base model"):
        load_adapter_entries(adapted(other, init_weights=True), state, ["ctc.ctc_lo"], "adapter.pth")


def test_loading_refuses_a_file_without_the_adapter_tensors(tiny_asr) -> None:
    base = copy.deepcopy(tiny_asr)
    state = {key: value for key, value in adapted(tiny_asr).state_dict().items() if "w_1" not in key}
    with pytest.raises(AdapterCheckpointError, match=r"missing \['decoder.decoders.0.feed_forward.w_1"):
        load_adapter_entries(adapted(base, init_weights=True), state, ["ctc.ctc_lo"], "adapter.pth")


def test_fingerprints_survive_a_dtype_cast_of_the_model(tiny_asr) -> None:
    base = copy.deepcopy(tiny_asr)
    model = adapted(tiny_asr).to(torch.bfloat16)
    assert all(layer.base_fingerprint.dtype == torch.float64 for _, layer in iter_adapter_layers(model))
    load_adapter_entries(adapted(base, init_weights=True), model.state_dict(), ["ctc.ctc_lo"], "adapter.pth")


def test_an_adapter_only_file_of_0a51e59_with_empty_rotations_still_loads(tiny_asr, asr_inputs) -> None:
    """Before format 2, plain SSVD stored its unused outer rotation as an empty parameter."""
    base = copy.deepcopy(tiny_asr)
    inject_adapters(tiny_asr, "ssvd", target_modules=TARGETS, k_ratio=0.5, init_weights=False)
    keep_adapter_entries(tiny_asr, [])
    state = tiny_asr.state_dict()
    old = {**state}
    for key in state:
        if key.endswith(".ssvd_shift"):
            old[key.replace("ssvd_shift", "ssvd_outer")] = torch.zeros(0)
    assert len(old) > len(state)
    inject_adapters(base, "ssvd", target_modules=TARGETS, k_ratio=0.5)
    load_adapter_entries(base, old, [], "old.pth")
    torch.testing.assert_close(base(*asr_inputs), tiny_asr(*asr_inputs))
