"""Skew-symmetric parameters -> rotation matrices, computed in float64.

A rotation of size k is parameterised by k(k-1)/2 numbers p placed below the diagonal of a
skew-symmetric matrix S (S[j, i] = p, S[i, j] = -p for i < j, in ``triu_indices`` order).
Maps from S to a matrix R (all equal I at S = 0):

- ``cayley``:  R = (I - S)^{-1} (I + S), exactly orthogonal (a linear solve of size k);
- ``neumann``: R = (I + S + S^2 + ... + S^n) (I + S), the Cayley map with (I - S)^{-1}
  replaced by its Neumann series truncated after S^n; orthogonal up to O(||S||^(n+1));
- ``expm``:    R = exp(S), exactly orthogonal (torch.linalg.matrix_exp);
- ``first_order``: R = I + 2S, ESPnet master's rotation (R R^T = I - 4 S^2, not orthogonal).

The k x k work is cheap next to the layer, so it always runs in float64, whatever the dtype
of the parameters: a half-precision model has no LU solve on the CPU and its ``matrix_exp``
overflows, and even float32 loses orthogonality at large angles (about 1e-5 for the Cayley
map and 1e-3 for the exponential at k = 32). Callers cast R to the dtype they compute in.
"""

from __future__ import annotations

import torch

ROTATION_DTYPE = torch.float64


def num_skew_params(k: int) -> int:
    """Free parameters of a k x k skew-symmetric matrix: k(k-1)/2."""
    return k * (k - 1) // 2


def skew_from_params(params: torch.Tensor, k: int) -> torch.Tensor:
    """The k x k skew-symmetric S with S[j, i] = p, S[i, j] = -p for i < j (dtype of ``params``)."""
    rows, cols = torch.triu_indices(k, k, offset=1, device=params.device)
    upper = params.new_zeros(k, k).index_put((rows, cols), params)
    return upper.T - upper


def rotation_from_skew(skew: torch.Tensor, method: str, neumann_terms: int = 4) -> torch.Tensor:
    """Map a skew-symmetric matrix to a (near-)orthogonal one by ``method``, in float64."""
    skew = skew.to(ROTATION_DTYPE)
    eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
    if method == "cayley":
        return torch.linalg.solve(eye - skew, eye + skew)
    if method == "neumann":
        series, power = eye, eye
        for _ in range(neumann_terms):
            power = power @ skew
            series = series + power
        return series @ (eye + skew)
    if method == "expm":
        return torch.linalg.matrix_exp(skew)
    if method == "first_order":
        return eye + 2.0 * skew
    raise ValueError(f"unknown rotation {method!r}; choose cayley, neumann, expm or first_order")
