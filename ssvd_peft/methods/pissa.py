"""PiSSA's home: its config and its registry entry (the math: ``ssvd_peft.layers.pissa``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ssvd_peft.config import check_choice, check_positive_int, option
from ssvd_peft.layers.pissa import PissaAdapter
from ssvd_peft.methods.lora import LoraConfig, check_rank
from ssvd_peft.registry import Method, register_method

SVD_METHODS = ("full", "randomized")


@dataclass
class PissaConfig(LoraConfig):
    """PiSSA: LoRA initialised from the top-r singular triplets, on the residual weight.
    Trainable per layer: r (in + out)."""

    method: ClassVar[str] = "pissa"

    svd_method: str = option("'full' SVD or 'randomized' (torch.svd_lowrank)", default="full")
    svd_niter: int = option("subspace iterations of the randomized SVD", default=4)

    def validate(self) -> None:
        super().validate()
        check_choice(self.method, "svd_method", self.svd_method, SVD_METHODS)
        check_positive_int(self.method, "svd_niter", self.svd_niter)

    def build(self, base_layer: nn.Linear) -> PissaAdapter:
        check_rank(self, base_layer.in_features, base_layer.out_features)
        return PissaAdapter(
            base_layer,
            self.rank,
            self.alpha,
            self.dropout,
            self.use_rslora,
            self.svd_method,
            self.svd_niter,
            self.init_weights,
        )


PISSA = register_method(Method("pissa", PissaConfig, PissaAdapter, knob="rank"))
