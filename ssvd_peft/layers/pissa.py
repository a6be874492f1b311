"""PiSSA (Meng et al., 2024, arXiv 2404.02948): LoRA on the principal singular subspace.

With the top-r SVD W ~ U_r diag(s_r) V_r^T, the factors start at
    A0 = diag(sqrt(s_r / scale)) V_r^T,   B0 = U_r diag(sqrt(s_r / scale)),
and train as LoRA on the residual W_res = W - scale * B0 A0. The residual is never formed: the
layer keeps W untouched and takes the frozen principal part off as a second low-rank path,
    y = x W^T + b + scale * ((dropout(x) A^T) B^T - (x A0^T) B0^T),
    delta W = scale * (B A - B0 A0)   (against W, so merging and unmerging are LoRA's).
At initialisation the two paths are the same numbers and the layer is W exactly. A0, B0 are
frozen buffers saved with the adapter: they, not a new SVD, define the residual when the adapter
is loaded again, so a randomized SVD reloads to the trained model whatever the random state.
Nothing is copied and the base weight is never rewritten, so PiSSA shares a layer with other
adapters like any method. Trainable parameters per layer: r (in + out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.layers.base import compute_dtype
from ssvd_peft.layers.lora import LoraAdapter
from ssvd_peft.layers.svd import top_singular_triplets


class PissaAdapter(LoraAdapter):
    """LoRA whose factors start as the principal part of W, minus that frozen part."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        svd_method: str = "full",
        svd_niter: int = 4,
        init_weights: bool = True,
    ) -> None:
        super().__init__(base_layer, rank, alpha, dropout, use_rslora, init_weights)
        self.svd_method = svd_method
        self.svd_niter = svd_niter
        a0, b0 = self.principal_factors(base_layer.weight)
        # Contiguous as lora_A and lora_B are, so both paths run the same kernels on the same numbers.
        self.register_buffer("initial_A", a0.to(base_layer.weight.dtype).contiguous())
        self.register_buffer("initial_B", b0.to(base_layer.weight.dtype).contiguous())
        self.lora_A.data.copy_(self.initial_A)
        self.lora_B.data.copy_(self.initial_B)
        if not init_weights:
            self.perturb()

    def initialize(self, init_weights: bool) -> None:
        """Factors come from the SVD in ``__init__``; nothing to draw here."""

    def perturb(self) -> None:
        """Move A and B off their initial values (a non-trivial adapter, for tests)."""
        with torch.no_grad():
            self.lora_A.add_(torch.randn_like(self.lora_A) * self.lora_A.std())
            self.lora_B.add_(torch.randn_like(self.lora_B) * self.lora_B.std())

    def principal_factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A0, B0) from the top-r singular triplets of ``weight``, computed in float32+."""
        u, s, v = top_singular_triplets(weight, self.rank, self.svd_method, self.svd_niter)
        root = torch.sqrt(s / self.scaling)
        return root[:, None] * v.T, u * root[None, :]

    def principal_output(self, x: torch.Tensor) -> torch.Tensor:
        """(x A0^T) B0^T, the frozen principal part's output without the scale (no dropout)."""
        return F.linear(F.linear(x, self.initial_A), self.initial_B)

    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        return base_layer(x) + self.scaling * (self.lora_output(x) - self.principal_output(x))

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(base_weight.dtype)
        trained = self.lora_B.to(dtype) @ self.lora_A.to(dtype)
        return self.scaling * (trained - self.initial_B.to(dtype) @ self.initial_A.to(dtype))
