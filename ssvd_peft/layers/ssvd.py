"""SSVD (Wang, Watanabe, Van hamme, ASRU 2025, arXiv 2509.02830) and SSVD-O (ICASSP 2026,
arXiv 2601.12600): structured fine-tuning inside the top-k singular subspace of W.

With the frozen top-k triplets W ~ U_k diag(s_k) V_k^T (U_k: output side, V_k: input side):

    W' = W + U_k M V_k^T,   M = P_out diag(s_k + d) P_in^T - diag(s_k),
    P_in  = blockdiag(R_in, I_{k - k_in}),   R_in  = rotation(S_in),  S_in  skew, k_in x k_in,
    P_out = blockdiag(R_out, I_{k - k_out}), R_out = rotation(S_out), S_out skew, k_out x k_out.

SSVD has k_out = 0 (P_out = I): the input (acoustic) side rotates, the outputs keep their
directions. SSVD-O also rotates the output (semantic) side. Trainable parameters per layer:
k + k_in (k_in - 1) / 2 + k_out (k_out - 1) / 2; all start at zero, so W' = W.

ESPnet master's variant (gated shift, first-order rotation) is ``ssvd_espnet.EspnetSsvdAdapter``.
The sizes k, k_in, k_out come resolved from the config (``ssvd_peft.methods.ssvd``).

Precision: the k x k core M is computed in float64 from the stored factors (U_k, s_k, V_k in
the weight's dtype) and the trainable parameters (float32, or float64 for a float64 weight),
then cast to the input's dtype; a bfloat16 or float16 model gets an exact rotation and an exact
zero update at initialisation.

Forward, for T tokens. Both paths pay the dense product T in out; on top of it the low-rank
path costs T k (in + k + out):
    y = x W^T + b + ((x V_k) M^T) U_k^T,
and the merged path costs k out (k + in) to build W' = W + (U_k M) V_k^T, then
    y = x W'^T + b.
In training both keep only x V_k (T x k) for backward, never W', and share one backward:
    dM = (dy U_k)^T (x V_k),   dx = dy W' (rebuilt when T > out, else dy W + ((dy U_k) M) V_k^T).
``prefers_merged_path`` compares the two forwards and the cheaper one runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ssvd_peft.layers.base import Adapter, compute_dtype
from ssvd_peft.layers.rotation import (
    ROTATION_DTYPE,
    num_skew_params,
    rotation_from_skew,
    skew_from_params,
)
from ssvd_peft.layers.svd import top_singular_triplets


def parameter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """float64 for a float64 weight, else float32 (half-precision parameters would lose small updates)."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def prefers_merged_path(tokens: int, in_features: int, out_features: int, k: int, training: bool) -> bool:
    """True if building W' once is cheaper (in multiply-adds) than the low-rank path.

    Low-rank: T k (in + k + out). Merged: k out (k + in) to build W', plus T in k for x V_k
    when training (kept for the gradient of M). The dense T in out and the backward are the
    same for both paths, so they cancel.
    """
    build = k * out_features * (k + in_features)
    low_rank = tokens * k * (in_features + k + out_features)
    merged = build + (tokens * in_features * k if training else 0)
    return merged < low_rank


class SubspaceLinear(torch.autograd.Function):
    """y = x W^T + b + ((x V_k) M^T) U_k^T on 2-d x, saving only x V_k for backward.

    ``merged`` computes the same y as x W'^T + b with W' = W + (U_k M) V_k^T. The gradient of
    M is (dy U_k)^T (x V_k) on either path; dx = dy W' rebuilds W' when T > out and otherwise
    takes the low-rank form dy W + ((dy U_k) M) V_k^T. W and b get gradients only if they
    require them (AdapterLinear freezes them). Backward computes in the dtype of dy, as
    autocast did in forward.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        core: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        singular_U: torch.Tensor,
        singular_V: torch.Tensor,
        merged: bool,
    ) -> torch.Tensor:
        projected = project(x, singular_V) if not merged or ctx.needs_input_grad[1] else None
        if merged:
            output = F.linear(x, adapted_weight(weight, core, singular_U, singular_V), bias)
        else:
            output = torch.addmm(F.linear(x, weight, bias), projected @ core.T, singular_U.T)
        ctx.save_for_backward(
            x if ctx.needs_input_grad[2] else None, projected, core, weight, singular_U, singular_V
        )
        return output

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, projected, core, weight, singular_U, singular_V = (
            None if t is None else t.to(grad_output.dtype) for t in ctx.saved_tensors
        )
        needs_x, needs_core, needs_weight, needs_bias = ctx.needs_input_grad[:4]
        rebuild = grad_output.shape[0] > weight.shape[0]
        grad_x = grad_core = grad_weight = grad_bias = None
        if needs_core or (needs_x and not rebuild):
            grad_up = project(grad_output, singular_U)
        if needs_core:
            grad_core = grad_up.T @ projected
        if needs_x and rebuild:
            grad_x = grad_output @ adapted_weight(weight, core, singular_U, singular_V)
        elif needs_x:
            grad_x = (grad_output @ weight).addmm_(grad_up @ core, singular_V.T)
        if needs_weight:
            grad_weight = grad_output.T @ x
        if needs_bias:
            grad_bias = grad_output.sum(0)
        return grad_x, grad_core, grad_weight, grad_bias, None, None, None


def project(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """rows @ basis for a thin basis (n x k), as (basis^T rows^T)^T: the same product, which
    BLAS runs faster in this orientation when k is small."""
    return (basis.T @ rows.T).T


def adapted_weight(
    weight: torch.Tensor, core: torch.Tensor, singular_U: torch.Tensor, singular_V: torch.Tensor
) -> torch.Tensor:
    """W' = W + (U_k M) V_k^T."""
    return torch.addmm(weight, singular_U @ core, singular_V.T)


class SsvdAdapter(Adapter):
    """Singular-value shift plus inner (and outer) rotations of the top-k singular vectors.

    Parameters (named after the method, as LoRA's are): ``ssvd_shift`` d (k), ``ssvd_inner`` the
    skew parameters of S_in (k_in (k_in - 1) / 2, only if k_in >= 2) and ``ssvd_outer`` those of
    S_out (k_out (k_out - 1) / 2, only if k_out >= 2). A rotation of size 0 or 1 has no parameter,
    so every parameter the adapter registers receives a gradient (DistributedDataParallel requires
    it).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        k: int,
        k_in: int,
        k_out: int = 0,
        rotation: str = "cayley",
        neumann_terms: int = 4,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.k, self.k_in, self.k_out = k, k_in, k_out
        self.rotation = rotation
        self.neumann_terms = neumann_terms
        weight = base_layer.weight
        u, s, v = top_singular_triplets(weight, k)
        self.register_buffer("singular_U", u.to(weight.dtype), persistent=False)
        self.register_buffer("singular_values", s.to(weight.dtype), persistent=False)
        self.register_buffer("singular_V", v.to(weight.dtype), persistent=False)
        factory = {"dtype": parameter_dtype(weight.dtype), "device": weight.device}
        self.ssvd_shift = nn.Parameter(torch.zeros(k, **factory))
        self.ssvd_inner = skew_parameter(k_in, factory)
        self.ssvd_outer = skew_parameter(k_out, factory)
        self.initialize(init_weights)

    def initialize(self, init_weights: bool) -> None:
        """Zero shift and angles (``init_weights``: W' = W), or a non-trivial adapter for tests:
        shifts ~ 10% of s, rotation angles ~ 0.1."""
        if init_weights:
            return
        with torch.no_grad():
            self.ssvd_shift.normal_(std=0.1 * float(self.singular_values.float().mean()))
            for params in (self.ssvd_inner, self.ssvd_outer):
                if params is not None:
                    params.normal_(std=0.1)

    def shifted_values(self) -> torch.Tensor:
        """s_k + d, in float64."""
        return self.singular_values.to(ROTATION_DTYPE) + self.ssvd_shift.to(ROTATION_DTYPE)

    def rotation_matrix(self, params: torch.Tensor | None, size: int) -> torch.Tensor | None:
        """R = rotation(skew(params)) in float64, the size x size block of blockdiag(R, I)
        (None if there is no rotation)."""
        if params is None:
            return None
        skew = skew_from_params(params.to(ROTATION_DTYPE), size)
        return rotation_from_skew(skew, self.rotation, self.neumann_terms)

    def core_matrix(self) -> torch.Tensor:
        """M = P_out diag(s_k + d) P_in^T - diag(s_k), a k x k float64 matrix.

        Only the leading blocks of P_in and P_out rotate: diag(s_k + d) P_in^T scales the
        rows of blockdiag(R_in^T, I), and P_out mixes only its first k_out rows.
        """
        k, k_in, k_out = self.k, self.k_in, self.k_out
        inner = self.rotation_matrix(self.ssvd_inner, k_in)
        outer = self.rotation_matrix(self.ssvd_outer, k_out)
        values = self.shifted_values()
        if inner is None:
            scaled = torch.diag(values)
        else:
            scaled = values[:k_in, None] * inner.T
            if k_in < k:
                scaled = torch.block_diag(scaled, torch.diag(values[k_in:]))
        if outer is not None:
            rotated = outer @ scaled[:k_out]
            scaled = rotated if k_out == k else torch.cat([rotated, scaled[k_out:]])
        return scaled - torch.diag(self.singular_values.to(ROTATION_DTYPE))

    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        core = self.core_matrix().to(x.dtype)
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
        core = self.core_matrix().to(dtype)
        return (self.singular_U.to(dtype) @ core) @ self.singular_V.to(dtype).T


def skew_parameter(size: int, factory: dict) -> nn.Parameter | None:
    """The size (size - 1) / 2 skew parameters of a rotation, at zero; None when there are none."""
    count = num_skew_params(size)
    return nn.Parameter(torch.zeros(count, **factory)) if count else None
