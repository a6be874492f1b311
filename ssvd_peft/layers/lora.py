"""LoRA (Hu et al., 2021, arXiv 2106.09685).

    y = x W^T + b + scale * (dropout(x) A^T) B^T,   scale = alpha / r  (alpha / sqrt(r): rsLoRA)

A in R^{r x in} starts kaiming-uniform (a = sqrt(5)), B in R^{out x r} starts at zero, so the
layer starts as the identity. Trainable parameters per layer: r (in + out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.config import LoraConfig
from ssvd_peft.layers.base import Adapter, TrainableSplit, compute_dtype


class LoraAdapter(Adapter):
    """Low-rank update scale * B A beside the frozen weight."""

    def __init__(self, base_layer: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        check_rank(config, base_layer.in_features, base_layer.out_features)
        self.rank = config.rank
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        dtype, device = base_layer.weight.dtype, base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(self.rank, base_layer.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(
            torch.empty(base_layer.out_features, self.rank, dtype=dtype, device=device)
        )
        self.initialize(config.init_weights)

    @staticmethod
    def trainable_split(config: LoraConfig, in_features: int, out_features: int) -> TrainableSplit:
        """A: r in (inner), B: r out (outer)."""
        check_rank(config, in_features, out_features)
        return TrainableSplit(inner=config.rank * in_features, outer=config.rank * out_features)

    def initialize(self, identity: bool) -> None:
        """A kaiming-uniform; B zero (identity) or random (a non-trivial adapter)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if identity:
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.normal_(self.lora_B, std=1.0 / self.rank)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """(dropout(x) A^T) B^T, without the scale."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        return base_layer(x) + self.scaling * self.lora_output(x)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(base_weight.dtype)
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))


def check_rank(config: LoraConfig, in_features: int, out_features: int) -> None:
    """A rank beyond min(in, out) adds parameters and no expressiveness: refuse it."""
    limit = min(in_features, out_features)
    if config.rank > limit:
        raise ValueError(
            f"{config.method}: rank {config.rank} is larger than this layer allows "
            f"(min(in={in_features}, out={out_features}) = {limit}); "
            f"lower rank, or give this module a smaller one in module_overrides"
        )
