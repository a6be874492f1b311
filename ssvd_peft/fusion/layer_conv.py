"""F3, hierarchical convolution over the layer axis (Shih and Harwath, 2024, arXiv 2406.12209)."""

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


def halvings(num_taps: int) -> int:
    """How many stride-2 steps take ``num_taps`` layers down to one: ceil(log2 |S|)."""
    return max(num_taps - 1, 0).bit_length()


@fusion_head("layer_conv")
class LayerConv(FusionHead):
    """F3: the normalised taps stacked along a layer axis, X in R^{B x T x |S| x dim}, then at every
    frame stride-2 convolutions along that axis, dim channels in and out, until one layer remains:

        X_0 = [LN(H_l)]_{l in S}
        X_{i+1} = Conv_i(GELU(X_i))  (no GELU before the first),   |S| -> ceil(|S| / 2) -> ... -> 1
        z = W X_last + b,   W: dim -> out_dim

    Kernel 3 pads one zero layer on each side; kernel 2 pads one on the right of an odd stack.
    LN is without affine parameters (as in the weighted sums); with one tap there is no convolution.
    Trainable parameters: ceil(log2 |S|) (kernel_size dim^2 + dim) + dim out_dim + out_dim.
    """

    def __init__(self, num_taps: int, dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__(num_taps, dim, out_dim)
        if kernel_size not in (2, 3):
            raise PeftConfigError(f"layer_conv: kernel_size must be 2 or 3, got {kernel_size!r}")
        self.kernel_size = kernel_size
        padding = 1 if kernel_size == 3 else 0
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel_size, stride=2, padding=padding) for _ in range(halvings(num_taps))
        )
        self.projection = nn.Linear(dim, out_dim)

    @classmethod
    def from_config(cls, config: FusionConfig, dim: int, taps: Sequence[int]) -> LayerConv:
        return cls(len(taps), dim, config.out_dim or dim, kernel_size=config.kernel_size)

    def forward(self, taps: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_taps(taps)
        batch, frames, dim = taps[0].shape
        layers = torch.stack([F.layer_norm(tap, (dim,)) for tap in taps], dim=-1)
        x = layers.reshape(batch * frames, dim, self.num_taps)
        for index, conv in enumerate(self.convs):
            if index:
                x = F.gelu(x)
            if self.kernel_size == 2 and x.shape[-1] % 2:
                x = F.pad(x, (0, 1))
            x = conv(x)
        return self.projection(x.reshape(batch, frames, dim))
