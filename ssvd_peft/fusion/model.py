"""A frozen encoder's taps and the head that fuses them, as one module.

fusion = FeatureFusion.from_config(config, embed=embed, blocks=blocks, dim=256)
z, z_lengths = fusion(x, lengths)              # (B, T', out_dim), (B,)
optimizer = torch.optim.Adam(fusion.trainable_parameters())
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion.cache import TapCache
from ssvd_peft.fusion.config import FusionConfig
from ssvd_peft.fusion.registry import FusionHead, build_fusion_head
from ssvd_peft.fusion.runner import RunBlock, TappedEncoder, as_hidden, call_block


class FeatureFusion(nn.Module):
    """z = head([H_l for l in S], mask): the taps of a ``TappedEncoder`` fused by a ``FusionHead``.

    ``forward(x, lengths)`` returns (z, out_lengths), z of shape (B, T', out_dim). Trainable: the head,
    plus any adapters inside the encoder's blocks; the rest of the encoder stays frozen.
    """

    def __init__(self, encoder: TappedEncoder, head: FusionHead) -> None:
        super().__init__()
        if head.num_taps != len(encoder.taps):
            raise PeftConfigError(
                f"the head fuses {head.num_taps} taps but the encoder yields {len(encoder.taps)} "
                f"({encoder.taps}); build the head over the encoder's taps"
            )
        self.encoder = encoder
        self.head = head

    @classmethod
    def from_config(
        cls,
        config: FusionConfig,
        embed: nn.Module,
        blocks: nn.ModuleList | Sequence[nn.Module],
        dim: int,
        run_block: RunBlock = call_block,
        hidden: Callable[[Any], torch.Tensor] = as_hidden,
    ) -> FeatureFusion:
        """The encoder runner over ``embed`` and ``blocks`` (hidden width ``dim``) with the taps, the
        head and, when ``config.cache_dir`` is set, the tap cache of ``config``."""
        taps = config.resolve_taps(len(blocks))
        cache = None
        if config.cache_dir is not None and config.cache_max_bytes is not None:
            cache = TapCache(config.cache_dir, config.cache_max_bytes)
        encoder = TappedEncoder(embed, blocks, taps, run_block=run_block, hidden=hidden, cache=cache)
        return cls(encoder, build_fusion_head(config, dim, taps))

    @property
    def out_dim(self) -> int:
        return self.head.out_dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps, mask, out_lengths = self.encoder(x, lengths)
        return self.head(taps, mask), out_lengths

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: the head's parameters and any trainable ones inside the encoder."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Numbers of parameters: ``head``, ``encoder_trainable`` (adapters) and ``encoder_frozen``."""
        encoder = list(self.encoder.parameters())
        return {
            "head": sum(parameter.numel() for parameter in self.head.parameters()),
            "encoder_trainable": sum(p.numel() for p in encoder if p.requires_grad),
            "encoder_frozen": sum(p.numel() for p in encoder if not p.requires_grad),
        }
