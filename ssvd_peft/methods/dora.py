"""DoRA's home: its config and its registry entry (the math: ``ssvd_peft.layers.dora``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ssvd_peft.layers.base import TrainableSplit
from ssvd_peft.layers.dora import DoraAdapter
from ssvd_peft.methods.lora import LoraConfig, check_rank
from ssvd_peft.registry import Method, register_method


@dataclass
class DoraConfig(LoraConfig):
    """DoRA: m * (W + scale B A) / ||W + scale B A||_row, norm detached in backward.
    Trainable per layer: r (in + out) + out."""

    method: ClassVar[str] = "dora"

    def build(self, base_layer: nn.Linear) -> DoraAdapter:
        check_rank(self, base_layer.in_features, base_layer.out_features)
        return DoraAdapter(
            base_layer, self.rank, self.alpha, self.dropout, self.use_rslora, self.init_weights
        )

    def trainable_split(self, in_features: int, out_features: int) -> TrainableSplit:
        """LoRA's r (in + out) plus the out magnitudes (outer)."""
        lora = super().trainable_split(in_features, out_features)
        return TrainableSplit(inner=lora.inner, outer=lora.outer + out_features)


DORA = register_method(Method("dora", DoraConfig, DoraAdapter, knob="rank"))
