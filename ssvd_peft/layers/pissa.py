"""PiSSA (Meng et al., 2024, arXiv 2404.02948): LoRA on the principal singular subspace.

With the top-r SVD W ~ U_r diag(s_r) V_r^T:
    A = diag(sqrt(s_r / scale)) V_r^T,   B = U_r diag(sqrt(s_r / scale)),
    W_res = W - scale * B0 A0   (written into the base layer: the forward is plain LoRA),
    y = x W_res^T + b + scale * (dropout(x) A^T) B^T.
The initial factors A0, B0 are frozen buffers saved with the adapter: they, not a new SVD,
define W_res when the adapter is loaded again, so a randomized SVD reloads to the trained model
whatever the random state. They also express the adapter against the ORIGINAL weight as a
rank-2r LoRA, A' = [A; A0], B' = [B, -B0].

The original W is kept (a CPU copy, outside the state dict and out of DistributedDataParallel's
buffer broadcasts), so unload, a rolled-back injection, ``unmerge`` and ``state_dict()`` give
back W bit for bit, not the rounded W_res + scale B0 A0. Trainable parameters per layer:
r (in + out).
"""

from __future__ import annotations

import torch
from torch import nn

from ssvd_peft.layers.base import compute_dtype
from ssvd_peft.layers.lora import LoraAdapter
from ssvd_peft.layers.svd import top_singular_triplets


class PissaAdapter(LoraAdapter):
    """LoRA whose factors start as the principal part of W, on the residual W_res."""

    rewrites_base = True

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
        self.keep_original(base_layer.weight)
        a0, b0 = self.principal_factors(base_layer.weight)
        self.register_buffer("initial_A", a0.to(base_layer.weight.dtype))
        self.register_buffer("initial_B", b0.to(base_layer.weight.dtype))
        self.lora_A.data.copy_(self.initial_A)
        self.lora_B.data.copy_(self.initial_B)
        self.rebase(base_layer)
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

    def keep_original(self, weight: torch.Tensor) -> None:
        """Keep a CPU copy of the original W (its own dtype), the source of W_res and of restores."""
        self.original_weight = weight.detach().to("cpu", copy=True)

    def original_base_weight(self, base_layer: nn.Linear) -> torch.Tensor:
        """The original W, in the base layer's current dtype and device."""
        weight = base_layer.weight
        return self.original_weight.to(device=weight.device, dtype=weight.dtype)

    def residual_weight(self, like: torch.Tensor) -> torch.Tensor:
        """W_res = W - scale * B0 A0, computed in float32+ and rounded once to the dtype and device
        of ``like`` (the base weight)."""
        dtype = compute_dtype(like.dtype)
        original = self.original_weight.to(device=like.device, dtype=dtype)
        principal = self.initial_B.to(dtype) @ self.initial_A.to(dtype)
        return (original - self.scaling * principal).to(like.dtype)

    def rebase(self, base_layer: nn.Linear) -> None:
        """Write W_res (from the kept W and the current A0, B0) into the base layer."""
        base_layer.weight.data.copy_(self.residual_weight(base_layer.weight))

    def unmerged_weight(self, merged_weight: torch.Tensor) -> torch.Tensor:
        """W_res again, recomputed from W and A0, B0: exact, whatever rounding the merge did."""
        return self.residual_weight(merged_weight)

    def release(self, base_layer: nn.Linear) -> None:
        """Give the base layer back its original weight W, bit for bit."""
        base_layer.weight.data.copy_(self.original_base_weight(base_layer))

    def task_deltas(self, base_layer: nn.Linear) -> list[torch.Tensor]:
        """[scale (B A - B0 A0)]: W' - W against the original W, exactly (not W_res + scale B A - W,
        which would carry W_res's rounding)."""
        dtype = compute_dtype(base_layer.weight.dtype)
        a, b = (factor.to(dtype) for factor in self.as_lora_factors())
        return [self.scaling * (b @ a)]

    def as_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') of the rank-2r LoRA that gives the same layer on the ORIGINAL weight."""
        return (
            torch.cat([self.lora_A.detach(), self.initial_A], dim=0),
            torch.cat([self.lora_B.detach(), -self.initial_B], dim=1),
        )
