"""DoRA (Liu et al., 2024, arXiv 2402.09353): weight-decomposed low-rank adaptation.

    W' = m * V / ||V||_row,   V = W + scale * B A,   m in R^{out} starts at ||W||_row.

The row norm is treated as a constant in backward (section 4.3 of the paper). The forward
never materialises W':  f = m / ||V||_row (detached),
    y = f * (x W^T) + f * scale * (dropout(x) A^T) B^T + b.
Trainable parameters per layer: r (in + out) + out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.config import DoraConfig
from ssvd_peft.layers.base import TrainableSplit
from ssvd_peft.layers.lora import LoraAdapter


class DoraAdapter(LoraAdapter):
    """LoRA direction update with a learned per-row magnitude."""

    def __init__(self, base_layer: nn.Linear, config: DoraConfig) -> None:
        super().__init__(base_layer, config)
        self.magnitude = nn.Parameter(self.row_norm(base_layer.weight).detach().clone())
        self.register_buffer("merged_row_norm", None, persistent=False)

    @staticmethod
    def trainable_split(config: DoraConfig, in_features: int, out_features: int) -> TrainableSplit:
        """LoRA's r (in + out) plus the out magnitudes (outer)."""
        lora = LoraAdapter.trainable_split(config, in_features, out_features)
        return TrainableSplit(inner=lora.inner, outer=lora.outer + out_features)

    def row_norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        """||W + scale B A||_row, detached: a constant in backward."""
        direction = base_weight + self.scaling * (self.lora_B @ self.lora_A)
        return torch.linalg.vector_norm(direction, dim=1).detach()

    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        factor = self.magnitude / self.row_norm(base_layer.weight)
        base_out = F.linear(x, base_layer.weight)
        adapted = factor * (base_out + self.scaling * self.lora_output(x))
        return adapted if base_layer.bias is None else adapted + base_layer.bias

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        direction = base_weight + self.scaling * (self.lora_B @ self.lora_A)
        factor = self.magnitude / self.row_norm(base_weight)
        return factor[:, None] * direction - base_weight

    def merge_into(self, base_layer: nn.Linear) -> None:
        weight = base_layer.weight
        self.merged_row_norm = self.row_norm(weight)
        direction = weight + self.scaling * (self.lora_B @ self.lora_A)
        weight.data.copy_((self.magnitude / self.merged_row_norm)[:, None] * direction)

    def unmerge_from(self, base_layer: nn.Linear) -> None:
        weight = base_layer.weight
        direction = weight * (self.merged_row_norm / self.magnitude)[:, None]
        weight.data.copy_(direction - self.scaling * (self.lora_B @ self.lora_A))
        self.merged_row_norm = None
