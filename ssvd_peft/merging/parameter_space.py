"""Merges in parameter space: averages of the models' weights (SOUP), a base-anchored interpolation
(Model Stock), and spherical means (Karcher, Multi-SLERP)."""

from __future__ import annotations

import math

import torch

from ssvd_peft.merging.ops import flat_cosine, normalised_weights, task_vectors, working_dtype
from ssvd_peft.merging.registry import merge_method

KARCHER_STEPS, KARCHER_TOLERANCE = 10, 1e-5


@merge_method("soup", needs_base=False)
def soup(
    base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float], **_: object
) -> torch.Tensor:
    """Model soup (Wortsman et al., 2022, arXiv 2203.05482): theta = sum_t w_t theta_t / sum_t w_t."""
    dtype = working_dtype(tensors[0])
    stacked = torch.stack([t.to(dtype) for t in tensors])
    w = normalised_weights(weights, stacked)
    return torch.einsum("t,t...->...", w, stacked)


@merge_method("model_stock")
def model_stock(
    base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], **_: object
) -> torch.Tensor:
    """Model Stock (Jang et al., 2024, arXiv 2403.19522): with cos the mean pairwise cosine of the
    flattened task vectors, t = T cos / (1 + (T - 1) cos) and theta = t mean_t theta_t + (1 - t) theta_0.
    One model gives that model (t = 1)."""
    taus = task_vectors(base, tensors)
    count = len(taus)
    if count == 1:
        return tensors[0].to(taus[0].dtype)
    pairs = [flat_cosine(taus[i], taus[j]) for i in range(count) for j in range(i + 1, count)]
    cos = sum(pairs) / len(pairs)
    ratio = count * cos / (1 + (count - 1) * cos) if (1 + (count - 1) * cos) != 0 else 0.0
    mean = torch.stack([t.to(taus[0].dtype) for t in tensors]).mean(0)
    return ratio * mean + (1 - ratio) * base.to(taus[0].dtype)


@merge_method("karcher", needs_base=False)
def karcher(
    base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float], **_: object
) -> torch.Tensor:
    """Karcher (Riemannian) mean on the unit sphere, per tensor: n_t = ||W_t||, u_t = W_t / n_t; from
    the normalised (weighted) mean of the u_t, iterate up to 10 times (tolerance 1e-5)
        a_t = arccos <u, u_t>,  V = sum_t w_t (a_t / sin a_t) (u_t - <u, u_t> u),
        u <- cos ||V|| u + sin ||V|| V / ||V||  (renormalised);
    the result is (sum_t w_t n_t) u, with w normalised to sum 1."""
    dtype = working_dtype(tensors[0])
    flat = torch.stack([t.to(dtype).flatten() for t in tensors])
    norms = flat.norm(dim=1)
    w = normalised_weights(weights, flat)
    if float(norms.min()) == 0.0:
        return (w @ flat).reshape(tensors[0].shape)
    units = flat / norms[:, None]
    u = w @ units
    u = u / u.norm()
    for _ in range(KARCHER_STEPS):
        cos = (units @ u).clamp(-1.0, 1.0)
        angles = torch.arccos(cos)
        factors = torch.where(
            angles > 1e-12, angles / torch.sin(angles).clamp_min(1e-12), torch.ones_like(angles)
        )
        tangent = (w * factors) @ (units - cos[:, None] * u[None, :])
        step = float(tangent.norm())
        if step < KARCHER_TOLERANCE:
            break
        u = math.cos(step) * u + math.sin(step) * tangent / step
        u = u / u.norm()
    return ((w @ norms) * u).reshape(tensors[0].shape)


@merge_method("multislerp", knobs={"on_task_vectors": False}, needs_base=False)
def multislerp(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    on_task_vectors: bool,
    **_: object,
) -> torch.Tensor:
    """Multi-SLERP: unit-normalise x_t (the weights, or the task vectors with ``on_task_vectors``),
    mean direction mu = normalise(sum_t w_t u_t), tangent v = sum_t w_t (u_t - <u_t, mu> mu), back on
    the sphere mu cos ||v|| + v sin ||v|| / ||v||, scaled by sum_t w_t ||x_t|| (w normalised)."""
    if on_task_vectors and base is None:
        raise ValueError("multislerp with on_task_vectors needs the base model")
    inputs = task_vectors(base, tensors) if on_task_vectors else [t.to(working_dtype(t)) for t in tensors]
    flat = torch.stack([x.flatten() for x in inputs])
    norms = flat.norm(dim=1)
    w = normalised_weights(weights, flat)
    units = flat / norms.clamp_min(torch.finfo(flat.dtype).tiny)[:, None]
    mu = w @ units
    mu = mu / mu.norm().clamp_min(torch.finfo(flat.dtype).tiny)
    tangent = w @ (units - (units @ mu)[:, None] * mu[None, :])
    length = float(tangent.norm())
    direction = mu if length < 1e-12 else math.cos(length) * mu + math.sin(length) * tangent / length
    merged = ((w @ norms) * direction).reshape(tensors[0].shape)
    return merged + base.to(merged.dtype) if on_task_vectors else merged
