"""What a feature-fusion set-up is: which hidden states to tap, how to fuse them, whether to cache them.

    config = FusionConfig.from_dict({"taps": [0, 4, 8, 12], "variant": "grouped", "groups": 2})
    taps = config.resolve_taps(num_blocks=12)          # [0, 4, 8, 12]
    config.resolve_groups(taps)                        # [[0, 4], [8, 12]]

Tap l names the hidden state H_l of an encoder with blocks 1 .. L: H_0 is the embedding output (the
input of block 1), H_l the output of block l. Bad values get one PeftConfigError naming the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from ssvd_peft.config import is_positive_int, option, reject_unknown
from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion.registry import get_fusion_head

GIGABYTE = 1024**3


@dataclass
class FusionConfig:
    """Hierarchical feature fusion over a frozen encoder: taps, head, tap cache (``from_dict`` for YAML)."""

    taps: list[int] | str = option(
        "block indices to tap (0: the embedding output, l: the output of block l) or 'all'",
        default="all",
    )
    variant: str = option("fusion head: weighted_sum | grouped | ladder | layer_conv", default="weighted_sum")
    groups: int | list[list[int]] = option(
        "grouped: a number of contiguous groups of near-equal size, or the groups as lists of taps",
        default=3,
    )
    reduction: int = option("ladder: the side network's width is dim // reduction", default=8)
    attention_heads: int = option("ladder: attention heads of each side block", default=4)
    dropout: float = option("ladder: dropout inside the side blocks", default=0.1)
    kernel_size: int = option("layer_conv: kernel along the layer axis, 2 or 3", default=3)
    out_dim: int | None = option("width of the fused output; None: the encoder's width", default=None)
    residual: bool = option(
        "start from the pretrained encoder: z = N(H_L) + g * head(taps), gate g zero at init (needs the "
        "last block among the taps)",
        default=False,
    )
    cache_dir: str | None = option(
        "directory of the on-disk tap cache; None: no cache (needs a frozen, deterministic encoder)",
        default=None,
    )
    cache_max_gb: float | None = option(
        "disk budget of the tap cache in GiB (required with cache_dir); utterances beyond it are "
        "computed every time",
        default=None,
    )

    def __post_init__(self) -> None:
        get_fusion_head(self.variant)
        if not (self.taps == "all" or isinstance(self.taps, (list, tuple))):
            raise PeftConfigError(
                f"fusion: taps must be 'all' or a list of block indices such as [0, 6, 12]; got {self.taps!r}"
            )
        for name in ("reduction", "attention_heads"):
            if not is_positive_int(getattr(self, name)):
                raise PeftConfigError(
                    f"fusion: {name} must be a positive integer, got {getattr(self, name)!r}"
                )
        if self.out_dim is not None and not is_positive_int(self.out_dim):
            raise PeftConfigError(f"fusion: out_dim must be a positive integer or None, got {self.out_dim!r}")
        if not isinstance(self.residual, bool):
            raise PeftConfigError(f"fusion: residual must be true or false, got {self.residual!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise PeftConfigError(f"fusion: dropout must be in [0, 1), got {self.dropout!r}")
        if self.kernel_size not in (2, 3):
            raise PeftConfigError(f"fusion: kernel_size must be 2 or 3, got {self.kernel_size!r}")
        if not (is_positive_int(self.groups) or isinstance(self.groups, (list, tuple))):
            raise PeftConfigError(
                f"fusion: groups must be a positive integer or lists of taps such as [[0, 4], [8, 12]]; "
                f"got {self.groups!r}"
            )
        self.check_cache()

    def check_cache(self) -> None:
        if self.cache_dir is None:
            return
        if self.cache_max_gb is None:
            raise PeftConfigError(
                f"fusion: cache_dir is {self.cache_dir!r} but cache_max_gb is not set; give the disk "
                "budget of the tap cache in GiB, e.g. cache_max_gb: 50"
            )
        if not (isinstance(self.cache_max_gb, (int, float)) and self.cache_max_gb > 0):
            raise PeftConfigError(
                f"fusion: cache_max_gb must be a positive number, got {self.cache_max_gb!r}"
            )

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> FusionConfig:
        """Build from a mapping (a YAML block); an unknown key gets the nearest known one."""
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise PeftConfigError(f"fusion: options must be a mapping {{option: value}}, got {options!r}")
        reject_unknown("fusion", options, [f.name for f in dataclasses.fields(cls)], "option")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def cache_max_bytes(self) -> int | None:
        return None if self.cache_max_gb is None else int(self.cache_max_gb * GIGABYTE)

    def resolve_taps(self, num_blocks: int) -> list[int]:
        """The tap indices for an encoder of ``num_blocks`` blocks, sorted (see ``resolve_taps``)."""
        return resolve_taps(self.taps, num_blocks)

    def resolve_groups(self, taps: Sequence[int]) -> list[list[int]]:
        """The groups of the grouped head as lists of taps: ``groups`` contiguous groups of near-equal
        size (the first ones one tap larger), or the given lists, which must be the taps in order."""
        taps = list(taps)
        if isinstance(self.groups, int):
            if self.groups > len(taps):
                raise PeftConfigError(
                    f"fusion: groups = {self.groups} but there are only {len(taps)} taps {taps}; "
                    f"use at most {len(taps)} groups or tap more blocks"
                )
            return even_groups(taps, self.groups)
        groups = [list(group) if isinstance(group, (list, tuple)) else group for group in self.groups]
        flat = [tap for group in groups if isinstance(group, list) for tap in group]
        if any(not isinstance(group, list) or not group for group in groups) or flat != taps:
            raise PeftConfigError(
                f"fusion: groups {groups} do not cover the taps {taps} contiguously and in order; "
                "give non-empty lists of taps that, joined, are the taps, e.g. "
                f"{even_groups(taps, min(3, len(taps)))}, or a number of groups"
            )
        return groups


def even_groups(taps: Sequence[int], count: int) -> list[list[int]]:
    """``taps`` cut into ``count`` contiguous groups whose sizes differ by at most one, larger first."""
    size, larger = divmod(len(taps), count)
    bounds = [0]
    for index in range(count):
        bounds.append(bounds[-1] + size + (index < larger))
    return [list(taps[start:end]) for start, end in pairwise(bounds)]


def resolve_taps(taps: Sequence[int] | str, num_blocks: int) -> list[int]:
    """``taps`` ('all': 0 .. num_blocks) checked against an encoder of ``num_blocks`` blocks: integers
    in 0 .. num_blocks, no repeats; returned sorted."""
    if taps == "all":
        return list(range(num_blocks + 1))
    if isinstance(taps, str) or not taps:
        raise PeftConfigError(
            "fusion: taps must be 'all' or a non-empty list of block indices in "
            f"0 .. {num_blocks}; got {taps!r}"
        )
    for tap in taps:
        if not isinstance(tap, int) or isinstance(tap, bool) or not 0 <= tap <= num_blocks:
            raise PeftConfigError(
                f"fusion: tap {tap!r} is out of range; the encoder has {num_blocks} blocks, so taps are "
                f"0 (the embedding output) .. {num_blocks} (the output of the last block)"
            )
    repeated = sorted({tap for tap in taps if list(taps).count(tap) > 1})
    if repeated:
        raise PeftConfigError(f"fusion: taps {list(taps)} name {repeated} more than once; list each tap once")
    return sorted(taps)
