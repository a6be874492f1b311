"""F2, a ladder side network over the taps (Ladder Side-Tuning, Sung et al., 2022, arXiv 2206.06522).

A narrow network of width d = dim // reduction runs beside the frozen encoder and reads one tap per
rung; gradients stay in the side network, none enter the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion.registry import FusionHead, fusion_head

if TYPE_CHECKING:
    from ssvd_peft.fusion.config import FusionConfig

GATE_TEMPERATURE = 0.1


class SideBlock(nn.Module):
    """A pre-LN Transformer block of width d, attending only to valid frames:

        s -> s + Dropout(MHA(LN(s), mask)),   s -> s + Dropout(W_2 GELU(W_1 LN(s))),   W_1: d -> 4d

    Parameters: 12 d^2 + 13 d.
    """

    def __init__(self, width: int, attention_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, attention_heads, dropout=dropout, batch_first=True)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        padding = None if mask is None else ~mask
        query = self.attention_norm(s)
        attended, _ = self.attention(query, query, query, key_padding_mask=padding, need_weights=False)
        s = s + self.dropout(attended)
        return s + self.dropout(self.feed_forward(self.feed_forward_norm(s)))


@fusion_head("ladder")
class Ladder(FusionHead):
    """F2, ladder side-tuning over taps H_{l_0} < H_{l_1} < ... (tap order):

        s_0 = Down_0 LN(H_{l_0})
        s_k = Block_k( mu_k s_{k-1} + (1 - mu_k) Down_k LN(H_{l_k}) ),   mu_k = sigmoid(alpha_k / 0.1)
        z   = Up LN(s_last)

    Down_k: dim -> d linear without bias, d = dim // reduction; alpha_k initialised to 0 (mu_k = 1/2);
    Block_k a ``SideBlock`` of width d whose attention sees only the valid frames of ``mask``;
    Up: d -> out_dim linear. LN before Down is without affine parameters (the taps differ in scale),
    the final LN has them. With one tap there is no block: z = Up LN(Down_0 LN(H)).
    Trainable parameters: |S| dim d + (|S| - 1)(12 d^2 + 13 d + 1) + 2 d + d out_dim + out_dim.
    """

    def __init__(
        self,
        num_taps: int,
        dim: int,
        out_dim: int,
        reduction: int = 8,
        attention_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(num_taps, dim, out_dim)
        width = dim // reduction
        if width < 1 or width % attention_heads:
            raise PeftConfigError(
                f"ladder: the side width dim // reduction = {dim} // {reduction} = {width} is not a "
                f"positive multiple of attention_heads = {attention_heads}; choose reduction and "
                "attention_heads so that it is"
            )
        self.reduction = reduction
        self.width = width
        self.downs = nn.ModuleList(nn.Linear(dim, width, bias=False) for _ in range(num_taps))
        self.alphas = nn.Parameter(torch.zeros(num_taps - 1))
        self.blocks = nn.ModuleList(SideBlock(width, attention_heads, dropout) for _ in range(num_taps - 1))
        self.final_norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, out_dim)

    @classmethod
    def from_config(cls, config: FusionConfig, dim: int, taps: Sequence[int]) -> Ladder:
        return cls(
            len(taps),
            dim,
            config.out_dim or dim,
            reduction=config.reduction,
            attention_heads=config.attention_heads,
            dropout=config.dropout,
        )

    def gates(self) -> torch.Tensor:
        """mu_k = sigmoid(alpha_k / 0.1), the weight of the side path at rung k."""
        return torch.sigmoid(self.alphas / GATE_TEMPERATURE)

    def forward(self, taps: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_taps(taps)
        downs = [down(F.layer_norm(tap, tap.shape[-1:])) for down, tap in zip(self.downs, taps, strict=True)]
        s = downs[0]
        for mu, block, down in zip(self.gates(), self.blocks, downs[1:], strict=True):
            s = block(mu * s + (1 - mu) * down, mask)
        return self.up(self.final_norm(s))
