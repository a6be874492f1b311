"""Adapter files: exact round trip, bound to their base model, checked, safe to read, one layout
for plain PyTorch and ESPnet, and files of earlier formats read (or refused with the way out)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ssvd_peft.adapter_file import AdapterFile, read_adapter_file, write_adapter_file
from ssvd_peft.checkpoint import AdapterCheckpointError, load_adapter, save_adapter
from ssvd_peft.inject import inject_adapters, iter_adapter_layers
from ssvd_peft.layers.base import AdapterLinear
from ssvd_peft.methods.hdmole_routing import attach_domain_router, domain_router

METHODS = {
    "lora": {"rank": 4},
    "dora": {"rank": 4},
    "pissa": {"rank": 4},
    "ssvd": {"k_ratio": 0.5},
    "ssvd_o": {"k_ratio": 0.5, "outer_share": 0.3},
    "ssvd_core": {"k_ratio": 0.5},
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

    path = save_adapter(base, tmp_path / "adapter.safetensors")
    load_adapter(pristine, path)

    assert torch.equal(pristine(inputs), expected)


@pytest.mark.parametrize("svd_method", ["full", "randomized"])
def test_pissa_reloads_to_the_trained_model_whatever_the_random_state(svd_method, inputs, tmp_path):
    """The principal part comes from the saved A0, B0, not from a new (randomized) SVD at load time."""
    base = TinyNet()
    inject_adapters(base, "pissa", target_modules=TARGETS, rank=4, svd_method=svd_method, svd_niter=1)
    with torch.no_grad():
        for _, layer in iter_adapter_layers(base):
            layer.peft_adapters["default"].lora_B.mul_(1.1)
    expected = base(inputs)
    path = save_adapter(base, tmp_path / "adapter.safetensors")

    for seed in (1, 2):
        fresh = TinyNet()  # seeds the generator itself
        torch.manual_seed(seed)
        load_adapter(fresh, path)
        assert torch.equal(fresh(inputs), expected), seed


def test_the_file_holds_only_the_adapter_in_the_state_dict_layout(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=["proj_in"], rank=1)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, header = set(f.keys()), f.metadata()
    prefix = "proj_in.peft_adapters.default."
    assert keys == {prefix + "lora_A", prefix + "lora_B", "proj_in.base_fingerprint"}
    assert keys - {"proj_in.base_fingerprint"} <= set(model.state_dict())
    assert (header["format"], header["version"], header["method"]) == ("ssvd-peft-adapter", "3", "lora")


def test_modules_to_save_travel_with_the_adapter(inputs, tmp_path):
    model = TinyNet()
    inject_adapters(model, "ssvd", target_modules=["proj_in"], init_weights=False)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    path = save_adapter(model, tmp_path / "adapter.safetensors", modules_to_save=["norm"])
    fresh = TinyNet()
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh.norm.weight, model.norm.weight)
    torch.testing.assert_close(fresh(inputs), model(inputs))


def test_another_base_model_is_refused_and_left_untouched(tmp_path):
    model = TinyNet(seed=0)
    inject_adapters(model, "ssvd_o", target_modules=TARGETS)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
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
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    with pytest.raises(AdapterCheckpointError, match="does not have"):
        load_adapter(nn.Sequential(nn.Linear(12, 12)), path)


def test_missing_file_and_foreign_files_get_clear_errors(tmp_path):
    with pytest.raises(AdapterCheckpointError, match="does not exist"):
        load_adapter(TinyNet(), tmp_path / "nope.pt")
    state_dict_file = tmp_path / "model.pth"
    torch.save(TinyNet().state_dict(), state_dict_file)
    with pytest.raises(AdapterCheckpointError, match="is an ESPnet model file; its method and options"):
        load_adapter(TinyNet(), state_dict_file)


def test_a_file_that_does_not_fit_its_config_fails_and_leaves_no_adapter_behind(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=TARGETS, rank=2)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    adapter = read_adapter_file(path)
    adapter.tensors["head.peft_adapters.default.lora_A"] = torch.zeros(3, 12)
    write_adapter_file(adapter, path)  # a consistent file (checksum included) of another shape

    fresh = TinyNet()
    with pytest.raises(
        AdapterCheckpointError, match=r"head\.peft_adapters\.default\.lora_A \(3, 12\) \(model: \(2, 12\)\)"
    ):
        load_adapter(fresh, path)
    assert not list(iter_adapter_layers(fresh))
    assert fresh.peft_config == {}


@pytest.mark.parametrize("edit", ["flip_a_tensor_byte", "edit_without_checksum", "truncate"])
def test_a_damaged_file_is_refused(edit, tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=TARGETS, rank=2, init_weights=False)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    if edit == "flip_a_tensor_byte":
        data = bytearray(path.read_bytes())
        tensor_bytes = model.proj_out.peft_adapters["default"].lora_B.detach().numpy().tobytes()
        where = data.find(tensor_bytes)
        assert where > 0, "the tensor's bytes are stored as they are"
        data[where + len(tensor_bytes) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        expected = "is damaged: its contents do not match the SHA-256"
    elif edit == "edit_without_checksum":
        with safe_open(str(path), framework="pt") as f:
            header, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        tensors["head.peft_adapters.default.lora_B"] *= 1.0001
        save_file(tensors, str(path), metadata=header)
        expected = "is damaged: its contents do not match the SHA-256"
    else:
        path.write_bytes(path.read_bytes()[:-100])
        expected = "is not a readable adapter file"

    fresh = TinyNet()
    with pytest.raises(AdapterCheckpointError, match=expected):
        load_adapter(fresh, path)
    assert not list(iter_adapter_layers(fresh))


def test_another_format_version_is_refused_with_the_versions(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=["head"])
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**header, "version": "4"})
    with pytest.raises(AdapterCheckpointError, match="has format version 4; this ssvd-peft reads version 3"):
        load_adapter(TinyNet(), path)


class _Payload:
    """An arbitrary Python object: unpickling it would run code of the file's choosing."""


def test_arbitrary_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "ssvd-peft-adapter", "version": 1, "tensors": _Payload()}, path)
    with pytest.raises(AdapterCheckpointError, match="not a readable adapter file"):
        load_adapter(TinyNet(), path)


def format_1_payload(model: nn.Module, method: str, options: dict) -> dict:
    """What 0a51e59's save_adapter wrote: sections per layer, parameters only, pickled."""
    inject_adapters(model, method, target_modules=TARGETS, init_weights=False, **options)
    layers = dict(iter_adapter_layers(model))
    tensors = {
        f"{name}.{key}": value.detach().clone()
        for name, layer in layers.items()
        for key, value in layer.peft_adapters["default"].named_parameters()
    }
    if method == "ssvd":
        tensors.update({f"{name}.ssvd_outer": torch.zeros(0) for name in layers})  # its empty parameter
    return {
        "format": "ssvd-peft-adapter",
        "version": 1,
        "method": method,
        "config": json.dumps(model.peft_config["default"].to_dict()),
        "tensors": tensors,
        "fingerprints": {name: layer.base_fingerprint.clone() for name, layer in layers.items()},
        "modules_to_save": {},
    }


@pytest.mark.parametrize(("method", "options"), [("lora", {"rank": 2}), ("ssvd", {"k": 4})])
def test_a_file_of_format_1_loads_and_converts(method, options, inputs, tmp_path):
    model = TinyNet()
    torch.save(format_1_payload(model, method, options), tmp_path / "old.pt")
    fresh = TinyNet()
    load_adapter(fresh, tmp_path / "old.pt")
    assert torch.equal(fresh(inputs), model(inputs))
    converted = write_adapter_file(read_adapter_file(tmp_path / "old.pt"), tmp_path / "new.safetensors")
    again = TinyNet()
    load_adapter(again, converted)
    assert torch.equal(again(inputs), model(inputs))


def test_a_pissa_file_of_format_1_is_refused_with_the_way_out(tmp_path):
    torch.save(format_1_payload(TinyNet(), "pissa", {"rank": 2}), tmp_path / "old.pt")
    with pytest.raises(
        AdapterCheckpointError, match="PiSSA adapter of format 1, which lacks the initial factors"
    ):
        load_adapter(TinyNet(), tmp_path / "old.pt")


def test_an_adapter_saved_under_one_name_loads_under_another(inputs, tmp_path):
    model = TinyNet()
    inject_adapters(model, "ssvd_o", "accent", target_modules=TARGETS, init_weights=False)
    path = save_adapter(model, tmp_path / "accent.safetensors", adapter_name="accent")
    fresh = TinyNet()
    load_adapter(fresh, path, adapter_name="child")
    assert list(fresh.proj_in.peft_adapters) == ["child"]
    assert torch.equal(fresh(inputs), model(inputs))


def test_an_in_memory_adapter_file_has_its_layers_fingerprints(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=TARGETS, rank=1)
    adapter = read_adapter_file(save_adapter(model, tmp_path / "a.safetensors"))
    assert isinstance(adapter, AdapterFile)
    assert sorted(adapter.fingerprints) == sorted(TARGETS)
    assert adapter.fingerprints["proj_in"][:2].tolist() == [24.0, 12.0]


def test_saving_an_unknown_adapter_fails_without_writing(tmp_path):
    model = TinyNet()
    inject_adapters(model, "lora", target_modules=["head"])
    with pytest.raises(AdapterCheckpointError, match="no adapter named 'child'"):
        save_adapter(model, tmp_path / "adapter.safetensors", adapter_name="child")
    assert list(Path(tmp_path).iterdir()) == []


def test_an_hdmole_domain_router_travels_with_the_adapter_and_is_hooked_again(inputs, tmp_path):
    base = TinyNet()
    pristine = copy.deepcopy(base)
    inject_adapters(base, "hdmole", target_modules=["proj_out", "head"], init_weights=False, rank=2)
    router = attach_domain_router(base, feature_dim=24, source_module="proj_out")
    with torch.no_grad():
        router.proj.weight.normal_()
    expected = base(inputs)

    load_adapter(pristine, save_adapter(base, tmp_path / "adapter.safetensors"))

    loaded = domain_router(pristine)
    assert loaded is not None and (loaded.source_module, loaded.source_side) == ("proj_out", "input")
    torch.testing.assert_close(loaded.proj.weight, router.proj.weight)
    torch.testing.assert_close(pristine(inputs), expected, rtol=1e-5, atol=1e-5)
