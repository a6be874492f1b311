"""The table of fusion heads: each a module that fuses the taps of a frozen encoder, registered by name.

    @fusion_head("weighted_sum")
    class WeightedSum(FusionHead): ...

    head = build_fusion_head(config, dim=256, taps=[0, 6, 12])

A head maps |S| taps H_l of shape (B, T, dim), all at one frame rate, to z of shape (B, T, out_dim)
(``config.out_dim``, None: dim). ``forward(taps, mask=None)`` takes the taps in tap order and,
optionally, the (B, T) bool mask of valid frames; heads that mix frames use it, the others compute
frame by frame and ignore it. Each head builds itself from a config through ``from_config``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from ssvd_peft.errors import PeftConfigError

if TYPE_CHECKING:
    from ssvd_peft.fusion.config import FusionConfig


class FusionHead(nn.Module):
    """Fuses ``num_taps`` taps (B, T, dim) into (B, T, out_dim); every parameter is trainable."""

    def __init__(self, num_taps: int, dim: int, out_dim: int) -> None:
        super().__init__()
        self.num_taps = num_taps
        self.dim = dim
        self.out_dim = out_dim

    @classmethod
    def from_config(cls, config: FusionConfig, dim: int, taps: Sequence[int]) -> FusionHead:
        """The head of ``config`` over the resolved ``taps`` of an encoder of width ``dim``."""
        raise NotImplementedError(f"{cls.__name__} does not build from a config")

    def forward(self, taps: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def check_taps(self, taps: Sequence[torch.Tensor]) -> None:
        """Refuse a tap list that is not ``num_taps`` tensors of one shape (B, T, dim)."""
        if len(taps) != self.num_taps:
            raise PeftConfigError(
                f"{type(self).__name__} was built for {self.num_taps} taps but got {len(taps)}; "
                "build the head with the tap list the encoder runner returns"
            )
        first = tuple(taps[0].shape)
        for position, tap in enumerate(taps):
            shape = tuple(tap.shape)
            if len(shape) != 3 or shape[-1] != self.dim or shape != first:
                raise PeftConfigError(
                    f"{type(self).__name__} needs taps of one shape (B, T, {self.dim}); tap 0 is "
                    f"{first} but tap {position} is {shape}. All taps must share one frame rate: "
                    "choose taps after the same subsampling, or resample them to one length first"
                )


Head = TypeVar("Head", bound=type[FusionHead])

_HEADS: dict[str, type[FusionHead]] = {}


def fusion_head(name: str) -> Callable[[Head], Head]:
    """Register the decorated FusionHead class as variant ``name``."""

    def register(head: Head) -> Head:
        if name in _HEADS:
            raise ValueError(f"a fusion head named {name!r} is already registered")
        _HEADS[name] = head
        return head

    return register


def get_fusion_head(name: str) -> type[FusionHead]:
    """The class of variant ``name``; an unknown name gets the known ones and the nearest match."""
    if name not in _HEADS:
        close = difflib.get_close_matches(str(name), list(_HEADS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(_HEADS))
        raise PeftConfigError(f"unknown fusion variant {name!r}; choose one of {known}.{hint}")
    return _HEADS[name]


def fusion_head_names() -> list[str]:
    return sorted(_HEADS)


def build_fusion_head(config: FusionConfig, dim: int, taps: Sequence[int]) -> FusionHead:
    """The head named by ``config.variant`` over the resolved ``taps`` (see ``FusionConfig.resolve_taps``)
    of an encoder of width ``dim``; its output width is ``config.out_dim`` (None: ``dim``)."""
    return get_fusion_head(config.variant).from_config(config, dim, list(taps))
