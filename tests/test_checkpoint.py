"""Adapter-only checkpoints: exact round trip, bound to their base model, safe to read."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from ssvd_peft.checkpoint import AdapterCheckpointError, load_adapter, payload_checksum, save_adapter
from ssvd_peft.inject import inject_adapters, iter_adapter_layers
from ssvd_peft.layers.base import AdapterLinear
from ssvd_peft.methods.hdmole_routing import attach_domain_router, domain_router

METHODS = {
    "lora": {"rank": 4},
    "dora": {"rank": 4},
    "pissa": {"rank": 4},
    "ssvd": {"k_ratio": 0.5},
    "ssvd_o": {"k_ratio": 0.5, "outer_share": 0.3},
}
TARGETS = ["proj_in", "proj_out", "head"]


class TinyNet(nn.Module):
    """Tall, wide and square Linear layers with and without bias."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj_in = nn.Linear(12, 24)
        self.proj_out = nn.Linear(24, 12, bias=False)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj_out(torch.tanh(self.proj_in(x)))))


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_into_a_fresh_copy_of_the_base_gives_identical_outputs(method, inputs, tmp_path):
    base = TinyNet()
    pristine = copy.deepcopy(base)
    inject_adapters(base, method, target_modules=TARGETS, init_weights=False, **METHODS[method])
    expected = base(inputs)
    assert not torch.allclose(expected, pristine(inputs), atol=1e-4), "the adapter must be non-trivial"

    path = save_adapter(base, tmp_path / "adapter.pt")
    load_adapter(pristine, path)

    assert torch.equal(pristine(inputs), expected)


@pytest.mark.parametrize("svd_method", ["full", "randomized"])
def test_pissa_reloads_to_the_trained_model_whatever_the_random_state(svd_method, inputs, tmp_path):
    """The residual comes from the saved A0, B0, not from a new (randomized) SVD at load time."""
    base = TinyNet()
    inject_adapters(base, "pissa", target_modules=TARGETS, rank=4, svd_method=svd_method, svd_niter=1)
    with torch.no_grad():
        for _, layer in iter_adapter_layers(base):
            layer.peft_adapters["default"].lora_B.mul_(1.1)
    expected = base(inputs)
    path = save_adapter(base, tmp_path / "adapter.pt")

    for seed in (1, 2):
        fresh = TinyNet()  # seeds the generator itself
        torch.manual_seed(seed)
        load_adapter(fresh, path)
        assert torch.equal(fresh(inputs), expected), seed


def test_the_file_holds_only_the_adapter(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=["proj_in"], rank=1)
    path = save_adapter(model, tmp_path / "adapter.pt")
    payload = torch.load(path, weights_only=True)
    assert set(payload["tensors"]) == {"proj_in.lora_A", "proj_in.lora_B"}
    assert sum(t.numel() for t in payload["tensors"].values()) == 1 * (12 + 24)


def test_modules_to_save_travel_with_the_adapter(inputs, tmp_path):
    model = TinyNet()
    inject_adapters(model, "ssvd", target_modules=["proj_in"], init_weights=False)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    path = save_adapter(model, tmp_path / "adapter.pt", modules_to_save=["norm"])
    fresh = TinyNet()
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh.norm.weight, model.norm.weight)
    torch.testing.assert_close(fresh(inputs), model(inputs))


def test_another_base_model_is_refused_and_left_untouched(tmp_path):
    model = TinyNet(seed=0)
    inject_adapters(model, "ssvd_o", target_modules=TARGETS)
    path = save_adapter(model, tmp_path / "adapter.pt")
    other = TinyNet(seed=1)
    before = copy.deepcopy(other.state_dict())

    with pytest.raises(AdapterCheckpointError, match="another base model"):
        load_adapter(other, path)

    assert not any(isinstance(m, AdapterLinear) for m in other.modules())
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key])


def test_a_model_without_the_adapted_module_is_refused(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=["head"])
    path = save_adapter(model, tmp_path / "adapter.pt")
    with pytest.raises(AdapterCheckpointError, match="does not have"):
        load_adapter(nn.Sequential(nn.Linear(12, 12)), path)


def test_missing_file_and_foreign_files_get_clear_errors(tmp_path):
    with pytest.raises(AdapterCheckpointError, match="does not exist"):
        load_adapter(TinyNet(), tmp_path / "nope.pt")
    state_dict_file = tmp_path / "model.pth"
    torch.save(TinyNet().state_dict(), state_dict_file)
    with pytest.raises(AdapterCheckpointError, match="not an ssvd-peft adapter checkpoint"):
        load_adapter(TinyNet(), state_dict_file)


class _Payload:
    """An arbitrary Python object: unpickling it would run code of the file's choosing."""


def test_arbitrary_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "ssvd-peft-adapter", "version": 1, "tensors": _Payload()}, path)
    with pytest.raises(AdapterCheckpointError, match="not a readable adapter checkpoint"):
        load_adapter(TinyNet(), path)


def test_a_tampered_file_fails_and_leaves_no_adapter_behind(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=TARGETS, rank=2)
    path = save_adapter(model, tmp_path / "adapter.pt")
    payload = torch.load(path, weights_only=True)
    payload["tensors"]["head.lora_A"] = torch.zeros(3, 12)
    payload["checksum"] = payload_checksum(payload)
    torch.save(payload, path)

    fresh = TinyNet()
    with pytest.raises(AdapterCheckpointError, match=r"head\.lora_A has shape"):
        load_adapter(fresh, path)
    assert not list(iter_adapter_layers(fresh))
    assert fresh.peft_config == {}


@pytest.mark.parametrize("edit", ["flip_a_tensor_byte", "edit_without_checksum"])
def test_a_damaged_file_is_refused_by_its_checksum(edit, tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=TARGETS, rank=2, init_weights=False)
    path = save_adapter(model, tmp_path / "adapter.pt")
    if edit == "flip_a_tensor_byte":
        data = bytearray(path.read_bytes())
        tensor_bytes = model.proj_out.peft_adapters["default"].lora_B.detach().numpy().tobytes()
        where = data.find(tensor_bytes)
        assert where > 0, "the tensor's bytes are stored as they are"
        data[where + len(tensor_bytes) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        payload = torch.load(path, weights_only=True)
        payload["tensors"]["head.lora_B"] = payload["tensors"]["head.lora_B"] * 1.0001
        torch.save(payload, path)

    fresh = TinyNet()
    with pytest.raises(AdapterCheckpointError, match="is damaged: its contents do not match the SHA-256"):
        load_adapter(fresh, path)
    assert not list(iter_adapter_layers(fresh))


def test_an_older_format_version_is_refused_with_the_versions(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=["head"])
    path = save_adapter(model, tmp_path / "adapter.pt")
    payload = torch.load(path, weights_only=True)
    payload["version"] = 1
    torch.save(payload, path)
    with pytest.raises(AdapterCheckpointError, match="has format version 1; this ssvd-peft reads version 2"):
        load_adapter(TinyNet(), path)


def test_saving_an_unknown_adapter_fails_without_writing(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=["head"])
    with pytest.raises(AdapterCheckpointError, match="no adapter named 'child'"):
        save_adapter(model, tmp_path / "adapter.pt", adapter_name="child")
    assert list(Path(tmp_path).iterdir()) == []


def test_an_hdmole_domain_router_travels_with_the_adapter_and_is_hooked_again(inputs, tmp_path):
    base = TinyNet()
    pristine = copy.deepcopy(base)
    inject_adapters(base, "hdmole", target_modules=["proj_out", "head"], init_weights=False, rank=2)
    router = attach_domain_router(base, feature_dim=24, source_module="proj_out")
    with torch.no_grad():
        router.proj.weight.normal_()
    expected = base(inputs)

    load_adapter(pristine, save_adapter(base, tmp_path / "adapter.pt"))

    loaded = domain_router(pristine)
    assert loaded is not None and (loaded.source_module, loaded.source_side) == ("proj_out", "input")
    torch.testing.assert_close(loaded.proj.weight, router.proj.weight)
    torch.testing.assert_close(pristine(inputs), expected, rtol=1e-5, atol=1e-5)
