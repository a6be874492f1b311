"""The ``fusion`` block of an ESPnet training config: hierarchical feature fusion over the frozen
encoder of a pretrained ASR or speech-to-text model.

    fusion:
      variant: grouped               # weighted_sum (F0) | grouped (F1) | ladder (F2) | layer_conv (F3)
      taps: all                      # or block indices, e.g. [0, 2, 4, 6] (0: the embedding output)
      groups: 3                      # grouped: contiguous groups of taps (or lists of taps)
      residual: false                # true: encoder output + zero-init gate * fusion (starts as the base)
      reduction: 8                   # ladder: side width = encoder width / reduction
      train_modules: [decoder, ctc]  # trained in full beside the head (the default)
      cache_dir: null                # tap cache on disk (a frozen encoder and specaug: null)
      cache_max_gb: null
    peft_pretrained: exp/base/valid.acc.ave.pth
    peft: lora                       # optional: adapters inside the encoder's blocks as well
    peft_conf: {target_modules: [linear_q, linear_v, w_1, w_2], rank: 8}

The model's encoder becomes a ``FusedEncoder``: the pretrained encoder's embedding and blocks run
up to the deepest tap (without autograd unless a peft block put adapters into them), and the fusion
head's output is what the decoder and the CTC head read. Trained: the head, ``train_modules`` and
the adapters; with ``peft_save: adapter`` (the default) model files hold only those.

What stock ESPnet can load: nothing of a fusion model. Its decoder and CTC head were trained on the
fused features, not on the encoder's output, and the head is no ESPnet encoder; decode through
``python -m espnet_plugins.bin.asr_inference`` (or ``s2t_inference``), which rebuilds the model
from the experiment's config.yaml. The tap cache is a training device: inference never reads it.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from espnet.nets.pytorch_backend.nets_utils import make_pad_mask
from espnet.nets.pytorch_backend.transformer.subsampling import TooShortUttError, check_short_utt
from espnet2.asr.encoder.abs_encoder import AbsEncoder
from espnet2.utils.nested_dict_action import NestedDictAction
from torch import nn

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion import (
    FusionConfig,
    FusionHead,
    ResidualGate,
    TapCache,
    TappedEncoder,
    build_fusion_head,
    check_residual,
)
from ssvd_peft.layers.base import is_adapter_parameter

logger = logging.getLogger(__name__)

FUSION_KEY = "fusion"
TRAIN_MODULES_KEY = "train_modules"
DEFAULT_TRAIN_MODULES = ("decoder", "ctc")
HEAD = "encoder.head"  # the fusion head's module path in the model
RESIDUAL = "encoder.residual"  # the gate of a residual fusion
TAPS = "encoder.taps"  # the tapped (frozen or adapted) encoder's module path


@dataclass
class FusionOptions:
    """The fusion block: the core ``FusionConfig`` and the modules trained beside the head."""

    config: FusionConfig
    train_modules: list[str]

    def trained_modules(self) -> list[str]:
        """Module patterns trained in full (and saved): the head (and gate) and ``train_modules``."""
        return [HEAD, *([RESIDUAL] if self.config.residual else []), *self.train_modules]


def add_fusion_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hierarchical feature fusion (ssvd-peft)")
    group.add_argument(
        f"--{FUSION_KEY}",
        action=NestedDictAction,
        default=dict(),
        help="Fusion of the frozen encoder's hidden states: variant, taps, groups, reduction, out_dim, "
        "train_modules (default decoder, ctc), cache_dir, cache_max_gb (see ssvd_peft.fusion.FusionConfig); "
        "empty: no fusion",
    )


def fusion_options(args: argparse.Namespace) -> FusionOptions | None:
    """The fusion block of ``args``, or None when it is empty."""
    block = dict(getattr(args, FUSION_KEY, None) or {})
    if not block:
        return None
    train_modules = block.pop(TRAIN_MODULES_KEY, list(DEFAULT_TRAIN_MODULES))
    if isinstance(train_modules, str) or not all(isinstance(name, str) for name in train_modules):
        raise PeftConfigError(
            f"fusion.{TRAIN_MODULES_KEY} must be a list of module names such as [decoder, ctc]; "
            f"got {train_modules!r}"
        )
    return FusionOptions(FusionConfig.from_dict(block), list(train_modules))


class EncoderEmbedding(nn.Module):
    """The embedding step of an ESPnet encoder: (feats, lengths) -> (state, mask (B, 1, T')), as the
    encoders' forward does it: the input layer (subsampling with its mask, or a frame-wise layer),
    and ESPnet's ``TooShortUttError`` for an input too short for the subsampling."""

    def __init__(self, embed: nn.Module | None) -> None:
        super().__init__()
        self.embed = embed
        self.takes_mask = embed is not None and len(inspect.signature(embed.forward).parameters) >= 2

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[Any, torch.Tensor]:
        masks = (~make_pad_mask(lengths)[:, None, :]).to(feats.device)
        if self.embed is None:
            return feats, masks
        if not self.takes_mask:
            return self.embed(feats), masks
        too_short, limit = check_short_utt(self.embed, feats.size(1))
        if too_short:
            raise TooShortUttError(
                f"has {feats.size(1)} frames and is too short for subsampling (it needs more than "
                f"{limit} frames), return empty results",
                feats.size(1),
                limit,
            )
        return self.embed(feats, masks)


def hidden_state(state: Any) -> torch.Tensor:
    """The hidden states of a block's output: ESPnet's relative-position blocks pass (x, pos_emb)."""
    return state[0] if isinstance(state, tuple) else state


class FusedEncoder(AbsEncoder):
    """E(X) = head([H_l for l in S], mask): an ESPnet encoder whose output is the fusion of the frozen
    pretrained encoder's hidden states H_l (H_0 the embedding output, H_l the output of block l, before
    the encoder's final norm). With ``residual``, E(X) = N(H_L) + g * head(...), N the encoder's frozen
    ``after_norm`` (identity if it has none) and g a gate at zero: the pretrained encoder at init.
    Returns (fused (B, T', out_dim), lengths (B,), None) like every ESPnet encoder; ``output_size()``
    is the head's width (the pretrained encoder's unless ``out_dim`` is set).
    """

    def __init__(self, encoder: AbsEncoder, config: FusionConfig, cache: TapCache | None = None) -> None:
        super().__init__()
        blocks = getattr(encoder, "encoders", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not hasattr(encoder, "embed"):
            raise PeftConfigError(
                f"fusion needs an encoder made of an input layer `embed` and a list of blocks `encoders` "
                f"(ESPnet's Conformer, E-Branchformer and Transformer encoders); {type(encoder).__name__} "
                "has not: remove the fusion block or use one of those encoders"
            )
        taps = config.resolve_taps(len(blocks))
        self.taps = TappedEncoder(
            EncoderEmbedding(encoder.embed), blocks, taps, hidden=hidden_state, cache=cache
        )
        self.head: FusionHead = build_fusion_head(config, encoder.output_size(), taps)
        self.residual: ResidualGate | None = None
        if config.residual:
            check_residual(taps, len(blocks), encoder.output_size(), self.head.out_dim)
            self.final_norm = getattr(encoder, "after_norm", None) or nn.Identity()
            self.residual = ResidualGate(self.head.out_dim)
        self.interctc_use_conditioning = False

    def output_size(self) -> int:
        return self.head.out_dim

    def forward(
        self, xs_pad: torch.Tensor, ilens: torch.Tensor, prev_states: torch.Tensor | None = None, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        taps, mask, lengths = self.taps(xs_pad, ilens)
        fused = self.head(taps, mask)
        if self.residual is not None:
            fused = self.residual(self.final_norm(taps[-1]), fused)
        return fused, lengths, None


def attach_fusion(model: nn.Module, options: FusionOptions, training: bool) -> FusedEncoder:
    """Freeze ``model.encoder`` (its pretrained weights loaded; adapters injected into it stay
    trainable) and replace it by a ``FusedEncoder``. With ``training`` and a ``cache_dir``, the taps
    are cached on disk (one directory per rank); inference never reads the cache."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise PeftConfigError(
            f"fusion needs a model with an encoder; {type(model).__name__} has none: remove the fusion block"
        )
    for name, parameter in encoder.named_parameters():
        parameter.requires_grad_(is_adapter_parameter(name))
    cache = tap_cache(model, options.config) if training else None
    model.encoder = FusedEncoder(encoder, options.config, cache)
    return model.encoder


def tap_cache(model: nn.Module, config: FusionConfig) -> TapCache | None:
    """The configured tap cache (None without ``cache_dir``); refused when the encoder's input is
    augmented (SpecAugment would give other taps every epoch)."""
    if config.cache_dir is None or config.cache_max_bytes is None:
        return None
    if getattr(model, "specaug", None) is not None:
        raise PeftConfigError(
            "fusion.cache_dir: the tap cache needs the same encoder input every epoch, but specaug is "
            "on (it changes the features each time); set specaug: null, or drop cache_dir"
        )
    directory = Path(config.cache_dir)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        directory = directory / f"rank{torch.distributed.get_rank()}"
    return TapCache(directory, config.cache_max_bytes)


def fusion_budget(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a fused model: the head (with a residual fusion's gate), the trainable
    encoder parameters (adapters), every trainable parameter (head, adapters, train_modules) and the
    whole model."""
    named = dict(model.named_parameters())
    return {
        "head": sum(p.numel() for n, p in named.items() if n.startswith((f"{HEAD}.", f"{RESIDUAL}."))),
        "encoder_trainable": sum(
            p.numel() for n, p in named.items() if n.startswith(f"{TAPS}.") and p.requires_grad
        ),
        "trainable": sum(p.numel() for p in named.values() if p.requires_grad),
        "model_parameters": sum(p.numel() for p in named.values()),
    }


def log_fusion_budget(model: nn.Module, fused: FusedEncoder) -> None:
    budget = fusion_budget(model)
    logger.info(
        "Feature fusion (%s over taps %s): head %d parameters, encoder (adapters) %d, trainable in all %d "
        "of %d",
        type(fused.head).__name__,
        fused.taps.taps,
        budget["head"],
        budget["encoder_trainable"],
        budget["trainable"],
        budget["model_parameters"],
    )
