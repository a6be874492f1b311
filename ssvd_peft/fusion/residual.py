"""Fusion that starts from the pretrained encoder: the head's output enters through a gate at zero.

    z = N(H_L) + g * head([H_l for l in S]),    g in R^D, g = 0 at init

N(H_L) is what the pretrained encoder returns (its final norm N over the last block's output H_L, or
H_L itself when it has none), so at initialisation the fused model is the pretrained model exactly,
as every adapter of the library is; the first step moves g (its gradient is the head's output) and
from then on the head learns. A decoder trained on the encoder's output keeps its input at the start
instead of meeting a new representation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssvd_peft.errors import PeftConfigError


class ResidualGate(nn.Module):
    """z = base + g * fused with a per-channel gate g of width ``dim``, zero at init."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, base: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        return base + self.gate * fused


def check_residual(taps: Sequence[int], num_blocks: int, dim: int, out_dim: int) -> None:
    """A residual fusion needs the last block's output among the taps and the encoder's width."""
    if not taps or taps[-1] != num_blocks:
        raise PeftConfigError(
            f"fusion: residual adds the fusion to the encoder's output, the output of block {num_blocks}, "
            f"but the taps {list(taps)} stop before it; add {num_blocks} to the taps or set residual: false"
        )
    if out_dim != dim:
        raise PeftConfigError(
            f"fusion: residual adds the fusion to the encoder's output of width {dim}, but out_dim is "
            f"{out_dim}; drop out_dim or set residual: false"
        )
