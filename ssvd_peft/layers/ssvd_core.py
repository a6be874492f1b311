"""A free k x k core in the top-k singular subspace of W: what merging SSVD-family adapters keeps.

With the frozen top-k triplets W ~ U_k diag(s_k) V_k^T (the same U_k, V_k every SSVD and SSVD-O
adapter of W uses):

    W' = W + U_k M V_k^T,   M in R^{k x k} (starts at zero, so W' = W).

An SSVD or SSVD-O adapter is this form with the structured core M = P_out diag(s_k + d) P_in^T -
diag(s_k); a weighted sum (or any merge) of such cores is a k x k matrix without that structure,
so a merged subspace adapter keeps M itself: the same subspace, the same k, and an update
identical to the merged dense update whenever the merge commutes with U_k . V_k^T (Task
Arithmetic, TSV-M). It also trains, as LoRA-XS does (Balazy et al., 2024, arXiv 2405.17604).
Trainable parameters per layer: k^2. The forward and its backward are SSVD's (``SubspaceLinear``).
"""

from __future__ import annotations

import torch
from torch import nn

from ssvd_peft.layers.base import Adapter, compute_dtype
from ssvd_peft.layers.rotation import ROTATION_DTYPE
from ssvd_peft.layers.ssvd import SubspaceLinear, parameter_dtype, prefers_merged_path
from ssvd_peft.layers.svd import top_singular_triplets


class SsvdCoreAdapter(Adapter):
    """W' = W + U_k M V_k^T with a trainable k x k core ``ssvd_core`` M."""

    def __init__(self, base_layer: nn.Linear, k: int, init_weights: bool = True) -> None:
        super().__init__()
        self.k = k
        weight = base_layer.weight
        u, s, v = top_singular_triplets(weight, k)
        self.register_buffer("singular_U", u.to(weight.dtype), persistent=False)
        self.register_buffer("singular_values", s.to(weight.dtype), persistent=False)
        self.register_buffer("singular_V", v.to(weight.dtype), persistent=False)
        factory = {"dtype": parameter_dtype(weight.dtype), "device": weight.device}
        self.ssvd_core = nn.Parameter(torch.zeros(k, k, **factory))
        if not init_weights:
            with torch.no_grad():
                self.ssvd_core.normal_(std=0.1 * float(weight.float().norm()) / k)

    def core_matrix(self) -> torch.Tensor:
        """M, in float64 (as ``SsvdAdapter.core_matrix`` gives its structured core)."""
        return self.ssvd_core.to(ROTATION_DTYPE)

    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        core = self.ssvd_core.to(x.dtype)
        tokens = x.numel() // x.shape[-1]
        merged = prefers_merged_path(
            tokens, base_layer.in_features, base_layer.out_features, self.k, core.requires_grad
        )
        output = SubspaceLinear.apply(
            x.reshape(tokens, x.shape[-1]),
            core,
            base_layer.weight,
            base_layer.bias,
            self.singular_U,
            self.singular_V,
            merged,
        )
        return output.reshape(*x.shape[:-1], base_layer.out_features)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(base_weight.dtype)
        return (self.singular_U.to(dtype) @ self.ssvd_core.to(dtype)) @ self.singular_V.to(dtype).T
