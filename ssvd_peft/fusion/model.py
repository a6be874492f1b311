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
from ssvd_peft.fusion.residual import ResidualGate, check_residual
from ssvd_peft.fusion.runner import RunBlock, TappedEncoder, as_hidden, call_block


class FeatureFusion(nn.Module):
    """z = head([H_l for l in S], mask): the taps of a ``TappedEncoder`` fused by a ``FusionHead``;
    with ``residual``, z = N(H_L) + g * head(...) (``residual.py``; N: ``final_norm``, frozen, identity
    when None), which is the pretrained encoder's output at init.

    ``forward(x, lengths)`` returns (z, out_lengths), z of shape (B, T', out_dim). Trainable: the head
    (and the gate g), plus any adapters inside the encoder's blocks; the rest of the encoder stays frozen.
    """

    def __init__(
        self,
        encoder: TappedEncoder,
        head: FusionHead,
        residual: bool = False,
        final_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if head.num_taps != len(encoder.taps):
            raise PeftConfigError(
                f"the head fuses {head.num_taps} taps but the encoder yields {len(encoder.taps)} "
                f"({encoder.taps}); build the head over the encoder's taps"
            )
        self.encoder = encoder
        self.head = head
        self.residual: ResidualGate | None = None
        if residual:
            check_residual(encoder.taps, len(encoder.blocks), head.dim, head.out_dim)
            self.final_norm = final_norm if final_norm is not None else nn.Identity()
            self.final_norm.requires_grad_(False)
            self.residual = ResidualGate(head.out_dim)

    @classmethod
    def from_config(
        cls,
        config: FusionConfig,
        embed: nn.Module,
        blocks: nn.ModuleList | Sequence[nn.Module],
        dim: int,
        run_block: RunBlock = call_block,
        hidden: Callable[[Any], torch.Tensor] = as_hidden,
        final_norm: nn.Module | None = None,
    ) -> FeatureFusion:
        """The encoder runner over ``embed`` and ``blocks`` (hidden width ``dim``) with the taps, the
        head and, when ``config.cache_dir`` is set, the tap cache of ``config``; ``final_norm``: the
        encoder's norm after its last block (for ``config.residual``)."""
        taps = config.resolve_taps(len(blocks))
        cache = None
        if config.cache_dir is not None and config.cache_max_bytes is not None:
            cache = TapCache(config.cache_dir, config.cache_max_bytes)
        encoder = TappedEncoder(embed, blocks, taps, run_block=run_block, hidden=hidden, cache=cache)
        return cls(encoder, build_fusion_head(config, dim, taps), config.residual, final_norm)

    @property
    def out_dim(self) -> int:
        return self.head.out_dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps, mask, out_lengths = self.encoder(x, lengths)
        fused = self.head(taps, mask)
        if self.residual is not None:
            fused = self.residual(self.final_norm(taps[-1]), fused)
        return fused, out_lengths

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: the head's (and gate's) parameters and any trainable ones inside the
        encoder."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Numbers of parameters: ``head`` (with the gate), ``encoder_trainable`` (adapters) and
        ``encoder_frozen`` (with the final norm)."""
        encoder = list(self.encoder.parameters())
        if self.residual is not None:
            encoder += list(self.final_norm.parameters())
        head = [*self.head.parameters(), *([] if self.residual is None else self.residual.parameters())]
        return {
            "head": sum(parameter.numel() for parameter in head),
            "encoder_trainable": sum(p.numel() for p in encoder if p.requires_grad),
            "encoder_frozen": sum(p.numel() for p in encoder if not p.requires_grad),
        }
