"""Merges through the singular vectors of 2-D task vectors: isotropic spectra (Iso-C, Iso-CTS),
task singular vectors (TSV-M, BoostedTSV-M), and KnOTS's shared basis for low-rank deltas.
Only 2-D weights reach these functions (the tensor rules give every other tensor the mean of its
task vectors). Every result is theta_0 + scaling * tau.

Directions with a zero singular value carry nothing, and their singular vectors are arbitrary: every
method here keeps only the numerically non-zero part of a spectrum (``nonzero_rank``), so the r of
a full fine-tune's task vector is min(out, in) and the r of a rank-8 adapter's update is 8 (a
flattened spectrum or an orthogonalised stack never picks up arbitrary null-space directions)."""

from __future__ import annotations

import torch

from ssvd_peft.merging.ops import (
    as_task_vectors,
    elected_sign,
    nonzero_rank,
    polar_factor,
    trim_to_top,
    weighted_sum,
)
from ssvd_peft.merging.registry import merge_method

POLAR_METHODS = ("svd", "newton_schulz")


def weighted_task_vectors(base: torch.Tensor, models: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w_t tau_t for the stacked models, in place."""
    return as_task_vectors(base, models).mul_(weights[:, None, None])


@merge_method("iso_c", knobs={"scaling": 1.0}, subspace=True)
def iso_c(
    base: torch.Tensor, models: torch.Tensor, weights: torch.Tensor, *, scaling: float, **_: object
) -> torch.Tensor:
    """Iso-C (Marczak et al., 2025, arXiv 2502.04959): D = sum_t w_t tau_t = U diag(s) Vh;
    tau = mean(s) U Vh, the same directions with a flat spectrum."""
    total = weighted_sum(weights, as_task_vectors(base, models))
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    rank = nonzero_rank(s, total.shape)
    if rank == 0:
        return base.clone()
    return base + scaling * s[:rank].mean() * (u[:, :rank] @ vh[:rank])


@merge_method("iso_cts", knobs={"scaling": 1.0, "common_fraction": 0.8}, subspace=True)
def iso_cts(
    base: torch.Tensor,
    models: torch.Tensor,
    weights: torch.Tensor,
    *,
    scaling: float,
    common_fraction: float,
    **_: object,
) -> torch.Tensor:
    """Iso-CTS (Marczak et al., 2025): with r the rank of sum_t w_t tau_t (min(out, in) for full
    fine-tunes) and T tasks, k_c = round(r f) lowered until
    T divides r - k_c, d = (r - k_c) / T. The common subspace is the top k_c of SVD(sum_t w_t tau_t);
    each task adds the top d triplets of its residual R_t = tau_t - U_c U_c^T tau_t. The stacked
    [U_1 .. U_T, U_c] and [Vh_1; ..; Vh_T; Vh_c] are orthogonalised (polar factor) and every singular
    value set to the mean of the kept ones."""
    taus = weighted_task_vectors(base, models, weights)
    total = taus.sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    count, rank = taus.shape[0], nonzero_rank(s, total.shape)
    if rank == 0:
        return base.clone()
    common = min(rank, round(rank * common_fraction))
    while (rank - common) % count:
        common -= 1
    per_task = (rank - common) // count
    common_u = u[:, :common]
    us, vhs, values = [common_u], [vh[:common]], [s[:common]]
    for tau in taus:
        residual = tau - common_u @ (common_u.T @ tau)
        ru, rs, rvh = torch.linalg.svd(residual, full_matrices=False)
        kept = min(per_task, nonzero_rank(rs, residual.shape))
        us.insert(-1, ru[:, :kept])
        vhs.insert(-1, rvh[:kept])
        values.insert(-1, rs[:kept])
    left = polar_factor(torch.cat(us, dim=1))
    right = polar_factor(torch.cat(vhs, dim=0))
    return base + scaling * torch.cat(values).mean() * (left @ right)


def task_singular_vectors(
    taus: torch.Tensor, keep: float | None, boost: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top k_t = floor(r_t keep) triplets of every tau_t (at least 1; keep default 1 / T; r_t the
    rank of tau_t), side by side: (U stack: out x sum k_t, s stack, Vh stack: sum k_t x in); with
    ``boost`` beta < 1 each task's kept values are floored at s_{j*}, j* the first index whose
    cumulative energy reaches beta. A task vector of zero adds nothing."""
    fraction = keep if keep is not None else 1.0 / len(taus)
    us, values, vhs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        rank = nonzero_rank(s, tau.shape)
        k = min(rank, max(1, int(rank * fraction)))
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        if boost is not None and boost < 1.0 and rank:
            energy = torch.cumsum(s.pow(2), 0) / s.pow(2).sum().clamp_min(torch.finfo(s.dtype).tiny)
            first = int(torch.searchsorted(energy, torch.tensor(boost, dtype=s.dtype)))
            s = torch.maximum(s, s[min(first, len(s) - 1)])
        us.append(u[:, :k])
        values.append(s[:k])
        vhs.append(vh[:k])
    return torch.cat(us, dim=1), torch.cat(values), torch.cat(vhs, dim=0)


def tsv_merge(taus: torch.Tensor, keep: float | None, boost: float | None, polar: str) -> torch.Tensor:
    if polar not in POLAR_METHODS:
        raise ValueError(f"polar must be one of {', '.join(POLAR_METHODS)}; got {polar!r}")
    u, s, vh = task_singular_vectors(taus, keep, boost)
    if s.numel() == 0:
        return torch.zeros_like(taus[0])
    return polar_factor(u, polar) @ torch.diag(s) @ polar_factor(vh, polar)


@merge_method("tsv_m", knobs={"scaling": 1.0, "keep": None, "polar": "svd"}, subspace=True)
def tsv_m(
    base: torch.Tensor,
    models: torch.Tensor,
    weights: torch.Tensor,
    *,
    scaling: float,
    keep: float | None,
    polar: str,
    **_: object,
) -> torch.Tensor:
    """TSV-M (Gargiulo et al., 2025, arXiv 2412.00081): keep the top floor(r keep) triplets of each
    SVD(w_t tau_t) (``keep`` default 1 / T), stack the U's as columns, the s's, the Vh's as rows;
    tau = polar(U stack) diag(s stack) polar(Vh stack), the polar factor by ``svd`` or
    ``newton_schulz`` (the seed paper's stable variant)."""
    taus = weighted_task_vectors(base, models, weights)
    return base + scaling * tsv_merge(taus, keep, None, polar)


@merge_method(
    "boosted_tsv_m", knobs={"scaling": 1.0, "keep": None, "polar": "svd", "beta": 0.3}, subspace=True
)
def boosted_tsv_m(
    base: torch.Tensor,
    models: torch.Tensor,
    weights: torch.Tensor,
    *,
    scaling: float,
    keep: float | None,
    polar: str,
    beta: float,
    **_: object,
) -> torch.Tensor:
    """BoostedTSV-M (Carvalho et al., 2026, arXiv 2603.05354; reconstructed from its abstract): TSV-M
    after lifting each task's kept singular values to a floor, s'_i = max(s_i, s_{j*}), j* the first
    index whose cumulative energy sum_{i <= j} s_i^2 / sum_i s_i^2 reaches ``beta`` (beta = 1 is
    TSV-M); smaller beta boosts more directions."""
    taus = weighted_task_vectors(base, models, weights)
    return base + scaling * tsv_merge(taus, keep, beta, polar)


def spectral_rank(values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """How many eigenvalues s_i^2 (descending, of a float64 Gram matrix of a ``shape`` matrix in
    ``dtype``) belong to non-zero singular values: s_i > tol s_1, tol the larger of ``nonzero_rank``'s
    max(shape) eps(dtype) and the Gram matrix's own resolution sqrt(max(shape) eps(float64))."""
    if values.numel() == 0 or float(values[0]) <= 0.0:
        return 0
    tolerance = max(max(shape) * torch.finfo(dtype).eps, (max(shape) * torch.finfo(torch.float64).eps) ** 0.5)
    return int((values > (tolerance**2) * float(values[0])).sum())


def wide_alignment(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For out <= T in: U from the eigenvectors of G = sum_t tau_t tau_t^T (out x out, accumulated
    in float64 one task at a time), truncated to the non-zero spectrum; the aligned blocks
    U^T tau_t = diag(s) Z_t overwrite the first r rows of the stack. Returns (blocks (T, r, in), U)."""
    count, rows, cols = taus.shape
    gram = torch.zeros(rows, rows, dtype=torch.float64, device=taus.device)
    for tau in taus:
        wide = tau.to(torch.float64)
        gram.addmm_(wide, wide.T)
        del wide
    values, vectors = torch.linalg.eigh(gram)
    del gram
    values, vectors = values.flip(0), vectors.flip(1)
    rank = spectral_rank(values, (rows, count * cols), taus.dtype)
    basis = vectors[:, :rank].to(taus.dtype)
    del vectors
    for tau in taus:
        tau[:rank] = basis.T @ tau
    return taus[:, :rank], basis


def tall_alignment(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For out > T in: V from the eigenvectors of K = [tau_i^T tau_j]_{i,j} (T in x T in, float64),
    truncated to the non-zero spectrum; the aligned blocks are diag(s) V_t^T and
    U = sum_t tau_t V_t / s. Returns (blocks (T, r, in), U)."""
    count, rows, cols = taus.shape
    kernel = torch.empty(count * cols, count * cols, dtype=torch.float64, device=taus.device)
    for i, left in enumerate(taus):
        for j in range(i, count):
            block = (left.T @ taus[j]).to(torch.float64)
            kernel[i * cols : (i + 1) * cols, j * cols : (j + 1) * cols] = block
            kernel[j * cols : (j + 1) * cols, i * cols : (i + 1) * cols] = block.T
    values, vectors = torch.linalg.eigh(kernel)
    del kernel
    values, vectors = values.flip(0), vectors.flip(1)
    rank = spectral_rank(values, (rows, count * cols), taus.dtype)
    s = values[:rank].sqrt()
    per_task = vectors[:, :rank].reshape(count, cols, rank)
    blocks = (s[None, :, None] * per_task.transpose(1, 2)).to(taus.dtype)
    basis = sum(tau @ (v / s).to(taus.dtype) for tau, v in zip(taus, per_task, strict=True))
    return blocks, basis


def ties_of_blocks(blocks: torch.Tensor, density: float) -> torch.Tensor:
    """TIES over aligned blocks (T, r, in): trim each to its top ``density``, elect signs, disjoint
    mean. Trims the blocks in place."""
    for block in blocks:
        trim_to_top(block, density)
    gamma = elected_sign(blocks.sum(0))
    numerator = torch.zeros_like(gamma)
    denominator = torch.zeros_like(gamma)
    for block in blocks:
        agree = (block.sign() == gamma).to(block.dtype)
        numerator.addcmul_(agree, block)
        denominator.add_(agree)
    return numerator.div_(denominator.clamp_min_(1.0))


@merge_method("knots", knobs={"scaling": 1.0, "density": 1.0}, subspace=True)
def knots(
    base: torch.Tensor,
    models: torch.Tensor,
    weights: torch.Tensor,
    *,
    scaling: float,
    density: float,
    **_: object,
) -> torch.Tensor:
    """KnOTS (Stoica et al., 2025, arXiv 2410.19735), for low-rank deltas: SVD of the deltas side by
    side along the input axis, [w_1 tau_1 | .. | w_T tau_T] = U diag(s) [Z_1 | .. | Z_T] / s, so every
    tau_t = U (diag(s) Z_t); merge the aligned blocks diag(s) Z_t with TIES (``density``) and map back:
    tau = U merged, over the r non-zero singular values (the r of T rank-k deltas is at most T k).

    The side-by-side matrix (out x T in) is never formed, so memory does not grow with T beyond the
    stack: U and s come from the smaller Gram matrix in float64 (``wide_alignment``,
    ``tall_alignment``)."""
    taus = weighted_task_vectors(base, models, weights)
    count, rows, cols = taus.shape
    if rows <= count * cols:
        blocks, basis = wide_alignment(taus)
    else:
        blocks, basis = tall_alignment(taus)
    if blocks.shape[1] == 0:
        return base.clone()
    return base + scaling * (basis @ ties_of_blocks(blocks, density))
