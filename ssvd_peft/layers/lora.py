"""LoRA (Hu et al., 2021, arXiv 2106.09685).

    y = x W^T + b + scale * (dropout(x) A^T) B^T,   scale = alpha / r  (alpha / sqrt(r): rsLoRA)

A in R^{r x in} starts kaiming-uniform (a = sqrt(5)), B in R^{out x r} starts at zero, so the
layer starts as the identity (``init_weights=False``: B random, a non-trivial adapter for tests).
Trainable parameters per layer: r (in + out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.layers.base import Adapter, compute_dtype


class LoraAdapter(Adapter):
    """Low-rank update scale * B A beside the frozen weight."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, rank, **factory))
        self.initialize(init_weights)

    def initialize(self, init_weights: bool) -> None:
        """A kaiming-uniform; B zero (``init_weights``: the identity) or random (a non-trivial adapter)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_weights:
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
