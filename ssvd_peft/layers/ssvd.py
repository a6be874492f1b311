"""SSVD (Wang, Watanabe, Van hamme, ASRU 2025, arXiv 2509.02830) and SSVD-O (ICASSP 2026,
arXiv 2601.12600): structured fine-tuning inside the top-k singular subspace of W.

With the frozen top-k triplets W ~ U_k diag(s_k) V_k^T (U_k: output side, V_k: input side):

    W' = W + U_k M V_k^T,   M = P_out diag(s_k + d) P_in^T - diag(s_k),
    P_in  = blockdiag(R_in, I_{k - k_in}),   R_in  = rotation(S_in),  S_in  skew, k_in x k_in,
    P_out = blockdiag(R_out, I_{k - k_out}), R_out = rotation(S_out), S_out skew, k_out x k_out.

SSVD has k_out = 0 (P_out = I): the input (acoustic) side rotates, the outputs keep their
directions. SSVD-O also rotates the output (semantic) side. Trainable parameters per layer:
k + k_in (k_in - 1) / 2 + k_out (k_out - 1) / 2; all start at zero, so W' = W.

``espnet_compat`` reproduces ESPnet master's SSVDLinear: the shift is gated,
d' = sigmoid(g) d, the rotation is first-order, A = I + 2S, and it acts on the singular vectors
of the SMALLER side (out >= in: P_in^T = A; out < in: P_out = A^T). Trainable: k + 1 + k_in(k_in-1)/2.

Forward. The low-rank path costs T k (in + out + k) for T tokens:
    y = x W^T + b + ((x V_k) M^T) U_k^T.
The merged path builds W' once, k in (out + k), then runs one dense layer:
    y = x W'^T + b.
``prefers_merged_path`` compares both (with backward in training) and the cheaper one runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.config import SsvdConfig, SsvdOConfig
from ssvd_peft.layers.base import Adapter, TrainableSplit
from ssvd_peft.layers.rotation import num_skew_params, rotation_from_skew, skew_from_params
from ssvd_peft.layers.svd import top_singular_triplets


@dataclass(frozen=True)
class SsvdDims:
    """Sizes of one layer's SSVD adapter: subspace k, inner rotation k_in, outer rotation k_out."""

    k: int
    k_in: int
    k_out: int


def rotation_size_for_budget(budget: float) -> int:
    """The largest j with j (j - 1) / 2 <= budget (0 when no rotation fits)."""
    size = math.floor((1.0 + math.sqrt(1.0 + 8.0 * max(budget, 0.0))) / 2.0)
    return size if size >= 2 else 0


def ssvd_dims(config: SsvdConfig, in_features: int, out_features: int) -> SsvdDims:
    """Resolve k, k_in and k_out of one layer from the config (see SsvdConfig / SsvdOConfig)."""
    m = min(in_features, out_features)
    k = config.k if config.k is not None else max(1, round(config.k_ratio * m))
    if k > m:
        raise ValueError(
            f"{config.method}: k = {k} is larger than this layer allows "
            f"(min(in={in_features}, out={out_features}) = {m}); lower k (or k_ratio), "
            "or give this module a smaller k in module_overrides"
        )
    if isinstance(config, SsvdOConfig):
        budget = config.rotation_budget if config.rotation_budget is not None else num_skew_params(k)
        inner_budget, outer_budget = (1 - config.outer_share) * budget, config.outer_share * budget
        k_in = config.k_in if config.k_in is not None else min(k, rotation_size_for_budget(inner_budget))
        k_out = config.k_out if config.k_out is not None else min(k, rotation_size_for_budget(outer_budget))
    else:
        k_in = config.k_in if config.k_in is not None else k
        k_out = 0
        if config.espnet_compat and out_features < in_features:
            k_in, k_out = 0, k_in
    for name, size in (("k_in", k_in), ("k_out", k_out)):
        if size > k:
            raise ValueError(
                f"{config.method}: {name} = {size} exceeds the subspace size k = {k}; lower it or raise k"
            )
    return SsvdDims(k=k, k_in=k_in, k_out=k_out)


def prefers_merged_path(tokens: int, in_features: int, out_features: int, k: int, training: bool) -> bool:
    """True if building W' once is cheaper (in multiply-adds) than the low-rank path.

    Inference: low-rank T k (in + out + k) vs merged k in (out + k).
    Training (forward + backward): low-rank T k (2 (in + out) + 3 k)
    vs merged 2 k in (out + k) + T in out (the gradient of the dense W').
    """
    build = k * in_features * (out_features + k)
    if training:
        low_rank = tokens * k * (2 * (in_features + out_features) + 3 * k)
        merged = 2 * build + tokens * in_features * out_features
    else:
        low_rank = tokens * k * (in_features + out_features + k)
        merged = build
    return merged < low_rank


class SsvdAdapter(Adapter):
    """Singular-value shift plus inner (and outer) rotations of the top-k singular vectors."""

    def __init__(self, base_layer: nn.Linear, config: SsvdConfig) -> None:
        super().__init__()
        self.dims = ssvd_dims(config, base_layer.in_features, base_layer.out_features)
        self.espnet_compat = config.espnet_compat
        self.rotation = "first_order" if config.espnet_compat else config.rotation
        self.neumann_terms = config.neumann_terms
        weight = base_layer.weight
        u, s, v = top_singular_triplets(weight, self.dims.k)
        self.register_buffer("singular_U", u.to(weight.dtype), persistent=False)
        self.register_buffer("singular_values", s.to(torch.float32), persistent=False)
        self.register_buffer("singular_V", v.to(weight.dtype), persistent=False)
        param = dict(dtype=torch.float32, device=weight.device)
        self.ssvd_shift = nn.Parameter(torch.zeros(self.dims.k, **param))
        self.ssvd_inner = nn.Parameter(torch.zeros(num_skew_params(self.dims.k_in), **param))
        self.ssvd_outer = nn.Parameter(torch.zeros(num_skew_params(self.dims.k_out), **param))
        self.ssvd_gate = nn.Parameter(torch.zeros(1, **param)) if config.espnet_compat else None
        if not config.init_weights:
            self.randomize()

    @staticmethod
    def trainable_split(config: SsvdConfig, in_features: int, out_features: int) -> TrainableSplit:
        """values: k shifts (+1 gate in espnet_compat); inner/outer: k_side (k_side - 1) / 2."""
        dims = ssvd_dims(config, in_features, out_features)
        return TrainableSplit(
            inner=num_skew_params(dims.k_in),
            outer=num_skew_params(dims.k_out),
            values=dims.k + (1 if config.espnet_compat else 0),
        )

    def randomize(self) -> None:
        """A non-trivial adapter (for tests): shifts ~ 10% of s, rotation angles ~ 0.1."""
        with torch.no_grad():
            self.ssvd_shift.normal_(std=0.1 * float(self.singular_values.mean()))
            self.ssvd_inner.normal_(std=0.1)
            self.ssvd_outer.normal_(std=0.1)
            if self.ssvd_gate is not None:
                self.ssvd_gate.normal_()

    def shifted_values(self) -> torch.Tensor:
        """s_k + d  (s_k + sigmoid(g) d in espnet_compat)."""
        shift = self.ssvd_shift if self.ssvd_gate is None else torch.sigmoid(self.ssvd_gate) * self.ssvd_shift
        return self.singular_values + shift

    def side_rotation(self, params: torch.Tensor, size: int) -> torch.Tensor:
        """blockdiag(R, I_{k - size}) with R = rotation(skew(params))."""
        k = self.dims.k
        if size == 0:
            return torch.eye(k, dtype=params.dtype, device=params.device)
        rotation = rotation_from_skew(skew_from_params(params, size), self.rotation, self.neumann_terms)
        if size == k:
            return rotation
        return torch.block_diag(rotation, torch.eye(k - size, dtype=params.dtype, device=params.device))

    def core_matrix(self) -> torch.Tensor:
        """M = P_out diag(s_k + d) P_in^T - diag(s_k), a k x k matrix."""
        p_in_t = self.side_rotation(self.ssvd_inner, self.dims.k_in)
        p_out = self.side_rotation(self.ssvd_outer, self.dims.k_out)
        if not self.espnet_compat:
            p_in_t = p_in_t.T
        else:
            p_out = p_out.T
        return p_out @ (self.shifted_values()[:, None] * p_in_t) - torch.diag(self.singular_values)

    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        core = self.core_matrix().to(x.dtype)
        tokens = x.numel() // x.shape[-1]
        training = torch.is_grad_enabled() and self.ssvd_shift.requires_grad
        if prefers_merged_path(
            tokens, base_layer.in_features, base_layer.out_features, self.dims.k, training
        ):
            weight = base_layer.weight + self.singular_U @ (core @ self.singular_V.T)
            return F.linear(x, weight, base_layer.bias)
        low_rank = F.linear(F.linear(F.linear(x, self.singular_V.T), core), self.singular_U)
        return base_layer(x) + low_rank

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        core = self.core_matrix().to(base_weight.dtype)
        return self.singular_U @ core @ self.singular_V.T
