"""Hierarchical feature fusion over a frozen encoder (Huo et al., 2022, arXiv 2211.02712).

Only a fusion head is trained on hidden states tapped from a frozen encoder, which runs without
autograd and only as deep as its deepest tap; taps can be cached on disk across epochs. The heads:
F0 ``weighted_sum`` (SUPERB), F1 ``grouped``, F2 ``ladder`` (Ladder Side-Tuning), F3 ``layer_conv``.

``config``: ``FusionConfig`` (taps, variant, knobs, cache) from a YAML block; ``registry``: the
fusion heads by name (``build_fusion_head``); ``weighted``, ``ladder``, ``layer_conv``: the heads
(importing this package registers them); ``runner``: ``TappedEncoder``, the frozen encoder run up to
its deepest tap; ``cache``: ``TapCache``, taps on disk; ``residual``: ``ResidualGate``, the fusion added to
the pretrained encoder's output through a gate at zero; ``model``: ``FeatureFusion``, runner and head.
"""

from ssvd_peft.fusion.cache import TapCache
from ssvd_peft.fusion.config import FusionConfig, resolve_taps
from ssvd_peft.fusion.ladder import Ladder, SideBlock
from ssvd_peft.fusion.layer_conv import LayerConv
from ssvd_peft.fusion.model import FeatureFusion
from ssvd_peft.fusion.registry import (
    FusionHead,
    build_fusion_head,
    fusion_head,
    fusion_head_names,
    get_fusion_head,
)
from ssvd_peft.fusion.residual import ResidualGate, check_residual
from ssvd_peft.fusion.runner import TappedEncoder
from ssvd_peft.fusion.weighted import Grouped, NormalisedWeightedSum, WeightedSum

__all__ = [
    "FeatureFusion",
    "FusionConfig",
    "FusionHead",
    "Grouped",
    "Ladder",
    "LayerConv",
    "NormalisedWeightedSum",
    "ResidualGate",
    "SideBlock",
    "TapCache",
    "TappedEncoder",
    "WeightedSum",
    "build_fusion_head",
    "check_residual",
    "fusion_head",
    "fusion_head_names",
    "get_fusion_head",
    "resolve_taps",
]
