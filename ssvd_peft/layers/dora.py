"""DoRA (Liu et al., 2024, arXiv 2402.09353): weight-decomposed low-rank adaptation.

    W' = m * V / ||V||_row,   V = W + scale * B A,   m in R^{out} starts at ||W||_row.

The row norm is treated as a constant in backward (section 4.3 of the paper). The forward
never materialises W':  f = m / ||V||_row (detached),
    y = f * (x W^T) + f * scale * (dropout(x) A^T) B^T + b.
The norm is computed in float32 (float64 for float64 weights) and floored at 1e-12, so a row of
W that is zero (m = 0 there) gives f = 0 and a zero output row, not 0 / 0; merging keeps such
rows of W aside, so unmerging restores them. Trainable parameters per layer: r (in + out) + out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.layers.base import compute_dtype
from ssvd_peft.layers.lora import LoraAdapter

NORM_FLOOR = 1e-12


class DoraAdapter(LoraAdapter):
    """LoRA direction update with a learned per-row magnitude."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_weights: bool = True,
    ) -> None:
        super().__init__(base_layer, rank, alpha, dropout, use_rslora, init_weights)
        self.magnitude = nn.Parameter(
            self.row_norm(base_layer.weight).to(base_layer.weight.dtype).detach().clone()
        )
        self.register_buffer("merged_row_norm", None, persistent=False)
        self.register_buffer("merged_zero_rows", None, persistent=False)

    def direction(self, base_weight: torch.Tensor) -> torch.Tensor:
        """V = W + scale B A, in float32+."""
        dtype = compute_dtype(base_weight.dtype)
        return base_weight.to(dtype) + self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def row_norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        """||W + scale B A||_row in float32+, detached: a constant in backward."""
        return torch.linalg.vector_norm(self.direction(base_weight), dim=1).detach()

    def row_factor(self, base_weight: torch.Tensor) -> torch.Tensor:
        """f = m / max(||V||_row, 1e-12) (float32+)."""
        norm = self.row_norm(base_weight).clamp_min(NORM_FLOOR)
        return self.magnitude.to(norm.dtype) / norm

    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        factor = self.row_factor(base_layer.weight).to(x.dtype)
        base_out = F.linear(x, base_layer.weight)
        adapted = factor * (base_out + self.scaling * self.lora_output(x))
        return adapted if base_layer.bias is None else adapted + base_layer.bias

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        direction = self.direction(base_weight)
        return self.row_factor(base_weight)[:, None] * direction - base_weight.to(direction.dtype)

    def merge_into(self, base_layer: nn.Linear) -> None:
        """W' = f V; keeps ||V||_row, and the rows of W where m = 0 (f V loses them)."""
        weight = base_layer.weight
        self.merged_row_norm = self.row_norm(weight).clamp_min(NORM_FLOOR)
        zero = self.magnitude.detach() == 0
        self.merged_zero_rows = weight.detach()[zero].clone() if bool(zero.any()) else None
        merged = self.row_factor(weight)[:, None] * self.direction(weight)
        weight.data.copy_(merged)

    def unmerged_weight(self, merged_weight: torch.Tensor) -> torch.Tensor:
        """W = W' max(||V||_row, 1e-12) / m - scale B A on rows with m != 0; the kept rows where m = 0."""
        dtype = compute_dtype(merged_weight.dtype)
        magnitude = self.magnitude.detach().to(dtype)
        zero = magnitude == 0
        ratio = self.merged_row_norm.to(dtype) / torch.where(zero, 1.0, magnitude)
        direction = merged_weight.detach().to(dtype) * ratio[:, None]
        weight = direction - self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
        if self.merged_zero_rows is not None:
            weight[zero] = self.merged_zero_rows.to(dtype)
        return weight.detach().to(merged_weight.dtype)

    def unmerge_from(self, base_layer: nn.Linear) -> None:
        super().unmerge_from(base_layer)
        self.merged_row_norm = None
        self.merged_zero_rows = None
