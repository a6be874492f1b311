"""LoRA's home: its config and its registry entry (the math: ``ssvd_peft.layers.lora``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ssvd_peft.config import AdapterConfig, PeftConfigError, check_positive_int, option
from ssvd_peft.layers.base import TrainableSplit
from ssvd_peft.layers.lora import LoraAdapter
from ssvd_peft.registry import Method, register_method


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: W x + (alpha / r) B A dropout(x). Trainable per layer: r (in + out)."""

    method: ClassVar[str] = "lora"

    rank: int = option("rank r of the update B A", default=8)
    alpha: float = option("scaling numerator: scale = alpha / r (alpha / sqrt(r) with rsLoRA)", default=16.0)
    dropout: float = option("dropout on the adapter input", default=0.0)
    use_rslora: bool = option("rank-stabilised scaling alpha / sqrt(r)", default=False)

    def validate(self) -> None:
        check_positive_int(self.method, "rank", self.rank)
        if not self.alpha > 0:
            raise PeftConfigError(f"{self.method}: alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftConfigError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}")

    def build(self, base_layer: nn.Linear) -> LoraAdapter:
        check_rank(self, base_layer.in_features, base_layer.out_features)
        return LoraAdapter(
            base_layer, self.rank, self.alpha, self.dropout, self.use_rslora, self.init_weights
        )

    def trainable_split(self, in_features: int, out_features: int) -> TrainableSplit:
        """A: r in (inner), B: r out (outer)."""
        check_rank(self, in_features, out_features)
        return TrainableSplit(inner=self.rank * in_features, outer=self.rank * out_features)


def check_rank(config: LoraConfig, in_features: int, out_features: int) -> None:
    """A rank beyond min(in, out) adds parameters and no expressiveness: refuse it."""
    limit = min(in_features, out_features)
    if config.rank > limit:
        raise ValueError(
            f"{config.method}: rank {config.rank} is larger than this layer allows "
            f"(min(in={in_features}, out={out_features}) = {limit}); "
            f"lower rank, or give this module a smaller one in module_overrides"
        )


LORA = register_method(Method("lora", LoraConfig, LoraAdapter, knob="rank"))
