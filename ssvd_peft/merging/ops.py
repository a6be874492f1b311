"""Tensor operations the merge methods share: precision, task vectors, sparsifiers, sign election,
polar factors. Operations on a stack of T tensors work in place or row by row, so a merge holds
the stack and a few tensors of one model's size, never several stacks."""

from __future__ import annotations

import torch

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def working_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, else float32: merges never compute in half precision."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def as_task_vectors(base: torch.Tensor, models: torch.Tensor) -> torch.Tensor:
    """tau_t = theta_t - theta_0 for the stacked models (T, ...), computed in place."""
    return models.sub_(base)


def weighted_sum(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """sum_t w_t x_t of stacked tensors (T, ...), without a (T, ...) temporary."""
    return torch.tensordot(weights, stacked, dims=1)


def dare(tau: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al., 2024, arXiv 2311.03099): keep each entry with probability 1 - p and divide the
    kept ones by 1 - p, so the expectation is tau. ``generator`` makes it reproducible. In place."""
    if drop <= 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=tau.dtype, device="cpu") >= drop
    return tau.mul_(keep.to(tau.device)).div_(1.0 - drop)


def dare_rows(taus: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE on every task vector of the stack (T, ...), one after the other, in place."""
    for tau in taus:
        dare(tau, drop, generator)
    return taus


def trim_to_top(tau: torch.Tensor, density: float) -> torch.Tensor:
    """tau with all but its top ``density`` fraction of entries (by magnitude) set to 0, in place."""
    if density >= 1.0:
        return tau
    count = round(density * tau.numel())
    if count <= 0:
        return tau.zero_()
    magnitude = tau.abs()
    threshold = magnitude.flatten().kthvalue(tau.numel() - count + 1).values
    return tau.mul_(magnitude >= threshold)


def elected_sign(total: torch.Tensor) -> torch.Tensor:
    """gamma = sign(total) per entry, for total = sum_t tau_t (trimmed); an entry whose sum is 0 takes
    the sign of the tensor's total (+1 if that is 0 too)."""
    overall = 1.0 if float(total.sum()) >= 0 else -1.0
    sign = total.sign()
    return torch.where(sign == 0, torch.full_like(sign, overall), sign)


def nonzero_rank(s: torch.Tensor, shape: torch.Size) -> int:
    """How many singular values (descending) exceed max(shape) * eps * s_max, eps of their dtype
    (the numerical rank, as ``torch.linalg.matrix_rank`` counts it)."""
    if s.numel() == 0:
        return 0
    tolerance = max(shape) * torch.finfo(s.dtype).eps * float(s[0])
    return int((s > tolerance).sum())


def polar_factor(matrix: torch.Tensor, method: str = "svd", steps: int = 5) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of P S Q^T = matrix (the nearest matrix with orthonormal
    columns or rows; for a rank-deficient matrix the partial isometry over its nonzero singular
    values, which is unique), by ``svd``, or by ``newton_schulz`` (which maps a zero singular value
    to zero too): X = G / ||G||_F, then ``steps`` times
    X <- a X + (b A + c A^2) X with A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315), on the wide
    orientation (tall inputs are transposed first); the result has singular values in a band around 1."""
    if method == "svd":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = nonzero_rank(s, matrix.shape)
        return u[:, :rank] @ vh[:rank]
    if method != "newton_schulz":
        raise ValueError(f"unknown polar factor method {method!r}; choose svd or newton_schulz")
    tall = matrix.shape[0] > matrix.shape[1]
    x = (matrix.T if tall else matrix).to(torch.float32)
    x = x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.to(matrix.dtype)
    return x.T if tall else x
