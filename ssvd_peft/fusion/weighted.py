"""Softmax-weighted sums of normalised taps: over all taps (F0) and per contiguous group (F1).

Each tap is normalised by a LayerNorm without affine parameters, LN(h) = (h - mean(h)) / sqrt(var(h) + eps)
over the feature axis, as the s3prl Featurizer and ESPnet's ``multilayer_feature`` do: the taps of
a deep encoder differ in scale, and a scale per tap would only repeat what the weights learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.fusion.registry import FusionHead, fusion_head

if TYPE_CHECKING:
    from ssvd_peft.fusion.config import FusionConfig


class NormalisedWeightedSum(nn.Module):
    """sum_l softmax(w)_l LN(H_l) over ``num_taps`` taps; w starts at 0 (the mean of the normalised taps)."""

    def __init__(self, num_taps: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_taps))

    def forward(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        normalised = torch.stack([F.layer_norm(tap, tap.shape[-1:]) for tap in taps])
        return torch.einsum("l,l...->...", self.weights.softmax(dim=0), normalised)


@fusion_head("weighted_sum")
class WeightedSum(FusionHead):
    """F0, the SUPERB weighted sum (s3prl Featurizer, ESPnet ``multilayer_feature``):

        z = P( sum_l softmax(w)_l LN(H_l) ),   w in R^|S| initialised to 0

    P is the identity when out_dim = dim, else a Linear dim -> out_dim.
    Trainable parameters: |S| (+ dim * out_dim + out_dim with the projection).
    """

    def __init__(self, num_taps: int, dim: int, out_dim: int) -> None:
        super().__init__(num_taps, dim, out_dim)
        self.weighted_sum = NormalisedWeightedSum(num_taps)
        self.projection = nn.Identity() if out_dim == dim else nn.Linear(dim, out_dim)

    @classmethod
    def from_config(cls, config: FusionConfig, dim: int, taps: Sequence[int]) -> WeightedSum:
        return cls(len(taps), dim, config.out_dim or dim)

    def forward(self, taps: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_taps(taps)
        return self.projection(self.weighted_sum(taps))


@fusion_head("grouped")
class Grouped(FusionHead):
    """F1, grouped hierarchical fusion: contiguous groups G_1 .. G_K of taps (low / mid / high), one
    weighted sum per group, concatenated and projected:

        z_k = sum_{l in G_k} softmax(w_k)_l LN(H_l),   w_k initialised to 0
        z = W [z_1; ...; z_K] + b,                     W in R^{out_dim x K dim}

    ``group_sizes`` are the numbers of taps in each group, in tap order.
    Trainable parameters: |S| + K dim out_dim + out_dim.
    """

    def __init__(self, group_sizes: Sequence[int], dim: int, out_dim: int) -> None:
        super().__init__(sum(group_sizes), dim, out_dim)
        self.group_sizes = list(group_sizes)
        self.groups = nn.ModuleList(NormalisedWeightedSum(size) for size in self.group_sizes)
        self.projection = nn.Linear(len(self.group_sizes) * dim, out_dim)

    @classmethod
    def from_config(cls, config: FusionConfig, dim: int, taps: Sequence[int]) -> Grouped:
        return cls([len(group) for group in config.resolve_groups(taps)], dim, config.out_dim or dim)

    def forward(self, taps: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_taps(taps)
        summaries = []
        start = 0
        for size, group in zip(self.group_sizes, self.groups, strict=True):
            summaries.append(group(taps[start : start + size]))
            start += size
        return self.projection(torch.cat(summaries, dim=-1))
