"""Merges of task vectors tau_t = theta_t - theta_0: their (sparsified) weighted sum (Task
Arithmetic, with optional DARE), sign-consensus merges (TIES, SCE) and competition balancing (PCB).
Every result is theta_0 + scaling * tau."""

from __future__ import annotations

import torch

from ssvd_peft.merging.ops import dare, elected_sign, task_vectors, trim_to_top
from ssvd_peft.merging.registry import merge_method


def weighted(taus: list[torch.Tensor], weights: list[float]) -> list[torch.Tensor]:
    return [w * tau for w, tau in zip(weights, taus, strict=True)]


@merge_method("task_arithmetic", knobs={"scaling": 1.0, "dare_drop": 0.0})
def task_arithmetic(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    scaling: float,
    dare_drop: float,
    generator: torch.Generator,
    **_: object,
) -> torch.Tensor:
    """Task Arithmetic (Ilharco et al., 2023, arXiv 2212.04089): theta_0 + lambda sum_t w_t tau_t;
    ``dare_drop`` p > 0 first sparsifies each tau_t by DARE."""
    taus = [dare(tau, dare_drop, generator) for tau in task_vectors(base, tensors)]
    return base.to(taus[0].dtype) + scaling * torch.stack(weighted(taus, weights)).sum(0)


@merge_method("ties", knobs={"scaling": 1.0, "density": 0.2, "dare_drop": 0.0})
def ties(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    scaling: float,
    density: float,
    dare_drop: float,
    generator: torch.Generator,
    **_: object,
) -> torch.Tensor:
    """TIES (Yadav et al., 2023, arXiv 2306.01708): trim each tau_t to its top ``density`` by
    magnitude (after DARE with ``dare_drop`` > 0), elect gamma = sign(sum_t w_t trimmed_t) (a zero
    takes the sign of the total), and take, per entry, the weighted mean of the trimmed values whose
    sign agrees with gamma (the disjoint mean; 0 where none does): theta_0 + lambda tau."""
    taus = [dare(tau, dare_drop, generator) for tau in task_vectors(base, tensors)]
    trimmed = torch.stack([trim_to_top(tau, density) for tau in taus])
    shape = (-1,) + (1,) * (trimmed.dim() - 1)
    w = torch.tensor(weights, dtype=trimmed.dtype, device=trimmed.device).view(shape)
    gamma = elected_sign(list(w * trimmed))
    agree = ((trimmed.sign() == gamma) & (trimmed != 0)).to(trimmed.dtype) * w
    merged = (agree * trimmed).sum(0) / agree.sum(0).clamp_min(torch.finfo(trimmed.dtype).tiny)
    return base.to(merged.dtype) + scaling * merged


@merge_method("sce", knobs={"scaling": 1.0, "select_topk": 1.0})
def sce(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    scaling: float,
    select_topk: float,
    **_: object,
) -> torch.Tensor:
    """SCE (FuseChat, Wan et al., 2024, arXiv 2408.07990): select the top ``select_topk`` fraction of
    positions by across-task variance of tau; weights w_t = mean(tau_t^2) / sum_s mean(tau_s^2); TIES
    sign masks M_t = [sign tau_t = gamma]; tau = sum_t w_t M_t tau_t / max(sum_t w_t M_t, 1e-6)."""
    taus = task_vectors(base, tensors)
    stacked = torch.stack(taus)
    if select_topk < 1.0 and len(taus) > 1:
        variance = stacked.var(dim=0, unbiased=False)
        keep = trim_to_top(variance, select_topk) != 0
        stacked = torch.where(keep, stacked, torch.zeros_like(stacked))
    energy = stacked.pow(2).flatten(1).mean(1)
    w = energy / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
    gamma = elected_sign(list(stacked))
    masks = (stacked.sign() == gamma).to(stacked.dtype)
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    numerator = (w.view(shape) * masks * stacked).sum(0)
    merged = numerator / (w.view(shape) * masks).sum(0).clamp_min(1e-6)
    return base.to(merged.dtype) + scaling * merged


@merge_method("pcb", knobs={"scaling": 1.0, "density": 0.2})
def pcb(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    scaling: float,
    density: float,
    **_: object,
) -> torch.Tensor:
    """PCB, parameter competition balancing (Du et al., 2024, arXiv 2410.02396), per tensor:
        b_intra_i = softmax(T norm(tau_i ⊙ tau_i)),   b_inter_i = sum_j softmax(norm(tau_i ⊙ tau_j)),
        b_i = b_intra_i ⊙ b_inter_i,  kept: the top ``density`` of each b_i,
        tau = sum_i b_i ⊙ tau_i / sum_i b_i  (over kept entries),
    with norm(x) = x / max |x| (entries in [-1, 1]) and the softmaxes over the entries of the tensor."""
    taus = weighted(task_vectors(base, tensors), weights)
    count = len(taus)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x / x.abs().max().clamp_min(torch.finfo(x.dtype).tiny)

    def softmax(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.flatten(), dim=0).reshape(x.shape)

    balances = []
    for tau in taus:
        intra = softmax(count * norm(tau * tau))
        inter = sum(softmax(norm(tau * other)) for other in taus)
        balance = intra * inter
        balances.append(torch.where(trim_to_top(balance, density) != 0, balance, torch.zeros_like(balance)))
    stacked_b, stacked_tau = torch.stack(balances), torch.stack(taus)
    merged = (stacked_b * stacked_tau).sum(0) / stacked_b.sum(0).clamp_min(1e-12)
    return base.to(merged.dtype) + scaling * merged
