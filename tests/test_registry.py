"""Adding a method touches one place: a method registered from this file goes through inject,
budget, save, load, merge and unload without a line of library code knowing it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from ssvd_peft.budget import equal_budget_configs, estimate_budget
from ssvd_peft.checkpoint import load_adapter, save_adapter
from ssvd_peft.config import AdapterConfig, PeftConfigError, config_from_dict, option
from ssvd_peft.inject import inject_adapters, merge_adapters, merge_and_unload, unload, unmerge_adapters
from ssvd_peft.layers.base import Adapter, AdapterLinear, TrainableSplit
from ssvd_peft.registry import Method, get_method, method_names, register_method, unregister_method


class ToyAdapter(Adapter):
    """W' = W + P Q, P in R^{out x width} (zero at start), Q in R^{width x in}."""

    def __init__(self, base_layer: nn.Linear, width: int, init_weights: bool = True) -> None:
        super().__init__()
        self.width = width
        self.toy_P = nn.Parameter(torch.zeros(base_layer.out_features, width))
        self.toy_Q = nn.Parameter(torch.randn(width, base_layer.in_features) / base_layer.in_features)
        if not init_weights:
            nn.init.normal_(self.toy_P)

    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        return base_layer(x) + (x @ self.toy_Q.T) @ self.toy_P.T

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.toy_P @ self.toy_Q


@dataclass
class ToyConfig(AdapterConfig):
    method: ClassVar[str] = "toy"

    width: int = option("inner width of P Q", default=2)

    def build(self, base_layer: nn.Linear) -> ToyAdapter:
        return ToyAdapter(base_layer, self.width, self.init_weights)

    def trainable_split(self, in_features: int, out_features: int) -> TrainableSplit:
        return TrainableSplit(inner=self.width * in_features, outer=self.width * out_features)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(6, 10), nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


@pytest.fixture
def toy() -> Method:
    method = register_method(Method("toy", ToyConfig, ToyAdapter, knob="width"))
    yield method
    unregister_method("toy")


def test_a_registered_method_goes_through_the_whole_library(toy, tmp_path):
    x = torch.randn(4, 6)
    plain = Net()
    model = Net()
    report = inject_adapters(model, "toy", target_modules=["up", "down"], width=3)
    assert torch.equal(model(x), plain(x)), "identity at the start"
    assert (
        report.trainable
        == 3 * (6 + 10) * 2
        == estimate_budget(Net(), "toy", target_modules=["up"], width=3).trainable * 2
    )
    with torch.no_grad():
        for name in ("up", "down"):
            model.get_submodule(name).peft_adapters["default"].toy_P.normal_()
    adapted = model(x)

    path = save_adapter(model, tmp_path / "toy.pt")
    fresh = Net()
    load_adapter(fresh, path)
    assert torch.equal(fresh(x), adapted)

    merge_adapters(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)
    unmerge_adapters(model)
    merged = merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, AdapterLinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unload(model)(x), plain(x), rtol=1e-5, atol=1e-6)

    match = equal_budget_configs(Net(), 64, {"toy": {"target_modules": ["up", "down"]}}, strict=True)["toy"]
    assert (match.knob, match.value, match.trainable) == ("width", 2, 64)


def test_the_registry_names_it_and_refuses_clashes(toy):
    assert "toy" in method_names() and get_method("toy") is toy
    assert config_from_dict("toy", {"target_modules": ["up"]}).width == 2
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("toy", ToyConfig, ToyAdapter, knob="width"))
    with pytest.raises(ValueError, match=r"ToyConfig\.method is 'toy', but it is registered as 'toy2'"):
        register_method(Method("toy2", ToyConfig, ToyAdapter, knob="width"))


def test_an_unknown_method_lists_the_registered_ones(toy):
    with pytest.raises(PeftConfigError, match=r"unknown adapter method 'toi'.*toy.*Did you mean 'toy'"):
        get_method("toi")


def test_every_builtin_method_has_a_home_that_builds_and_counts(tiny_asr):
    for name in ("lora", "dora", "pissa", "ssvd", "ssvd_o", "hdmole"):
        method = get_method(name)
        config = config_from_dict(name, {"target_modules": ["w_1"]})
        layer = tiny_asr.encoder.encoders[0].feed_forward.w_1
        adapter = config.build(copy.deepcopy(layer))
        assert isinstance(adapter, method.adapter)
        split = config.trainable_split(layer.in_features, layer.out_features)
        assert split.total == sum(p.numel() for p in adapter.parameters()), name
