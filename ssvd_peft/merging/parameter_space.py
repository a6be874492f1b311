"""Merges in parameter space: averages of the models' weights (SOUP), a base-anchored interpolation
(Model Stock), and spherical means (Karcher, Multi-SLERP)."""

from __future__ import annotations

import math

import torch

from ssvd_peft.merging.ops import as_task_vectors, weighted_sum
from ssvd_peft.merging.registry import merge_method

KARCHER_STEPS, KARCHER_TOLERANCE = 10, 1e-5


@merge_method("soup", needs_base=False)
def soup(base: torch.Tensor | None, models: torch.Tensor, weights: torch.Tensor, **_: object) -> torch.Tensor:
    """Model soup (Wortsman et al., 2022, arXiv 2203.05482): theta = sum_t w_t theta_t / sum_t w_t."""
    return weighted_sum(weights / weights.sum(), models)


@merge_method("model_stock")
def model_stock(base: torch.Tensor, models: torch.Tensor, weights: torch.Tensor, **_: object) -> torch.Tensor:
    """Model Stock (Jang et al., 2024, arXiv 2403.19522): with cos the mean pairwise cosine of the
    flattened task vectors, t = T cos / (1 + (T - 1) cos) and theta = t mean_t theta_t + (1 - t) theta_0
    = theta_0 + t mean_t tau_t. One model gives that model (t = 1)."""
    count = models.shape[0]
    taus = as_task_vectors(base, models).reshape(count, -1)
    ratio = 1.0
    if count > 1:
        gram = taus @ taus.T
        norms = gram.diagonal().sqrt()
        pairs = [
            float(gram[i, j] / (norms[i] * norms[j])) if float(norms[i] * norms[j]) > 0 else 0.0
            for i in range(count)
            for j in range(i + 1, count)
        ]
        cos = sum(pairs) / len(pairs)
        ratio = count * cos / (1 + (count - 1) * cos) if (1 + (count - 1) * cos) != 0 else 0.0
    return base + ratio * taus.mean(0).reshape(base.shape)


@merge_method("karcher", needs_base=False)
def karcher(
    base: torch.Tensor | None, models: torch.Tensor, weights: torch.Tensor, **_: object
) -> torch.Tensor:
    """Karcher (Riemannian) mean on the unit sphere, per tensor: n_t = ||W_t||, u_t = W_t / n_t; from
    the normalised (weighted) mean of the u_t, iterate up to 10 times (tolerance 1e-5)
        a_t = arccos <u, u_t>,  V = sum_t w_t (a_t / sin a_t) (u_t - <u, u_t> u),
        u <- cos ||V|| u + sin ||V|| V / ||V||  (renormalised);
    the result is (sum_t w_t n_t) u, with w normalised to sum 1."""
    shape = models.shape[1:]
    units = models.reshape(models.shape[0], -1)
    norms = units.norm(dim=1)
    w = weights / weights.sum()
    if float(norms.min()) == 0.0:
        return (w @ units).reshape(shape)
    units.div_(norms[:, None])
    u = w @ units
    u = u / u.norm()
    for _ in range(KARCHER_STEPS):
        cos = (units @ u).clamp(-1.0, 1.0)
        angles = torch.arccos(cos)
        factors = torch.where(
            angles > 1e-12, angles / torch.sin(angles).clamp_min(1e-12), torch.ones_like(angles)
        )
        coefficients = w * factors
        tangent = coefficients @ units - float(coefficients @ cos) * u
        step = float(tangent.norm())
        if step < KARCHER_TOLERANCE:
            break
        u = math.cos(step) * u + math.sin(step) * tangent / step
        u = u / u.norm()
    return ((w @ norms) * u).reshape(shape)


@merge_method("multislerp", knobs={"on_task_vectors": False}, needs_base=False)
def multislerp(
    base: torch.Tensor | None,
    models: torch.Tensor,
    weights: torch.Tensor,
    *,
    on_task_vectors: bool,
    **_: object,
) -> torch.Tensor:
    """Multi-SLERP: unit-normalise x_t (the weights, or the task vectors with ``on_task_vectors``),
    mean direction mu = normalise(sum_t w_t u_t), tangent v = sum_t w_t (u_t - <u_t, mu> mu), back on
    the sphere mu cos ||v|| + v sin ||v|| / ||v||, scaled by sum_t w_t ||x_t|| (w normalised)."""
    if on_task_vectors and base is None:
        raise ValueError("multislerp with on_task_vectors needs the base model")
    shape = models.shape[1:]
    inputs = as_task_vectors(base, models) if on_task_vectors else models
    units = inputs.reshape(inputs.shape[0], -1)
    tiny = torch.finfo(units.dtype).tiny
    norms = units.norm(dim=1)
    w = weights / weights.sum()
    units.div_(norms.clamp_min(tiny)[:, None])
    mu = w @ units
    mu = mu / mu.norm().clamp_min(tiny)
    tangent = w @ units - float(w @ (units @ mu)) * mu
    length = float(tangent.norm())
    direction = mu if length < 1e-12 else math.cos(length) * mu + math.sin(length) * tangent / length
    merged = ((w @ norms) * direction).reshape(shape)
    return merged + base if on_task_vectors else merged
