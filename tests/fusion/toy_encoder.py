"""A tiny frozen encoder for the fusion specifications: an embedding step and blocks that count calls.

    embed:  (B, T, FEATURES) -> (B, T // 2, DIM) by stacking frame pairs; mask (B, 1, T // 2) as ESPnet's
    block:  self-attention over valid frames + feed-forward, each with dropout and a residual

Dropout is high (0.5) so that a block left in train mode would make the taps visibly random.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssvd_peft.fusion import FeatureFusion, FusionConfig

FEATURES = 6
DIM = 16
NUM_BLOCKS = 4
DROPOUT = 0.5


class ToyEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * FEATURES, DIM)
        self.dropout = nn.Dropout(DROPOUT)
        self.calls = 0

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        batch, frames, features = x.shape
        frames //= 2
        pairs = x[:, : 2 * frames].reshape(batch, frames, 2 * features)
        mask = torch.arange(frames, device=x.device) < (lengths // 2)[:, None]
        return self.dropout(self.linear(pairs)), mask[:, None, :]


class ToyBlock(nn.Module):
    """x -> x + Dropout(attention(x)); x -> x + Dropout(W_2 relu(W_1 x)); remembers its calls, the rows
    it saw and whether autograd was on."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(DIM, DIM)
        self.key = nn.Linear(DIM, DIM)
        self.value = nn.Linear(DIM, DIM)
        self.w_1 = nn.Linear(DIM, 2 * DIM)
        self.w_2 = nn.Linear(2 * DIM, DIM)
        self.dropout = nn.Dropout(DROPOUT)
        self.calls = 0
        self.rows = 0
        self.grad_enabled: bool | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        self.rows += x.shape[0]
        self.grad_enabled = torch.is_grad_enabled()
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(DIM)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        x = x + self.dropout(weights @ self.value(x))
        return x + self.dropout(self.w_2(torch.relu(self.w_1(x)))), mask


class AdaptedBlock(ToyBlock):
    """A block with an adapter: a trainable shift ``delta`` added to its output."""

    def __init__(self) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(DIM))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = super().forward(x, mask)
        return x + self.delta, mask


def toy_encoder(adapted_block: int | None = None) -> tuple[ToyEmbed, nn.ModuleList]:
    """A frozen embed and NUM_BLOCKS frozen blocks; block ``adapted_block`` (1-based) carries an adapter."""
    embed = ToyEmbed()
    blocks = nn.ModuleList(
        AdaptedBlock() if index == adapted_block else ToyBlock() for index in range(1, NUM_BLOCKS + 1)
    )
    for name, parameter in [*embed.named_parameters(), *blocks.named_parameters()]:
        parameter.requires_grad_(name.endswith("delta"))
    return embed, blocks


def toy_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features (B, max length, FEATURES) with random values in the padding too."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), FEATURES, generator=generator)
    return x, torch.tensor(lengths)


def toy_fusion(variant: str = "weighted_sum", seed: int = 0, **options) -> FeatureFusion:
    """A FeatureFusion over a fresh toy encoder, every random draw from ``seed``."""
    torch.manual_seed(seed)
    embed, blocks = toy_encoder(options.pop("adapted_block", None))
    config = FusionConfig(variant=variant, **{"taps": [0, 1, 3], "reduction": 4, "groups": 2, **options})
    return FeatureFusion.from_config(config, embed=embed, blocks=blocks, dim=DIM)


def block_calls(fusion: FeatureFusion) -> list[int]:
    return [block.calls for block in fusion.encoder.blocks]
