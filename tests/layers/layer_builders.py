"""Builders shared by the layer specifications: one wrapped nn.Linear with one adapter."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ssvd_peft.config import config_from_dict
from ssvd_peft.layers import AdapterLinear

# (in_features, out_features): a tall layer (out > in) and a wide one (out < in).
SHAPES = {"tall": (12, 20), "wide": (20, 12)}


def make_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    """A float32 nn.Linear with random, well-conditioned weights (distinct singular values)."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def add_adapter(
    layer: nn.Linear | AdapterLinear, method: str, name: str = "default", **options: Any
) -> AdapterLinear:
    """Wrap ``layer`` (if needed) and give it adapter ``name`` of ``method``; returns the wrapper."""
    wrapper = layer if isinstance(layer, AdapterLinear) else AdapterLinear(layer)
    config = config_from_dict(method, {"target_modules": ["layer"], **options})
    wrapper.add_adapter(name, config.build(wrapper.base_layer))
    return wrapper


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


# Small, valid options of every method for layers of the SHAPES above.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 4, "alpha": 8.0},
    "dora": {"rank": 4, "alpha": 8.0},
    "pissa": {"rank": 4, "alpha": 8.0},
    "ssvd": {"k": 6},
    "ssvd_o": {"k": 6, "outer_share": 0.5},
}


class OneLinear(nn.Module):
    """The smallest model HF PEFT can adapt: one nn.Linear named ``fc``."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.fc = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def hf_lora_layer(base: nn.Linear, **lora_options: Any) -> nn.Module:
    """HF PEFT's LoRA layer (peft.tuners.lora.Linear) around a copy of ``base``, in eval mode."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(OneLinear(copy.deepcopy(base)), LoraConfig(target_modules=["fc"], **lora_options))
    model.eval()
    return model.base_model.model.fc
