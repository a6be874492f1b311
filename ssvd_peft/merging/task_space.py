"""Merges of task vectors tau_t = theta_t - theta_0: their (sparsified) weighted sum (Task
Arithmetic, with optional DARE), sign-consensus merges (TIES, SCE) and competition balancing (PCB).
Every result is theta_0 + scaling * tau. The stacked models become the task vectors in place, and
the consensus merges run task by task, so a merge holds the stack and a few tensors of one model's
size."""

from __future__ import annotations

import torch

from ssvd_peft.merging.ops import as_task_vectors, dare_rows, elected_sign, trim_to_top, weighted_sum
from ssvd_peft.merging.registry import merge_method


@merge_method("task_arithmetic", knobs={"scaling": 1.0, "dare_drop": 0.0})
def task_arithmetic(
    base: torch.Tensor,
    models: torch.Tensor,
    weights: torch.Tensor,
    *,
    scaling: float,
    dare_drop: float,
    generator: torch.Generator,
    **_: object,
) -> torch.Tensor:
    """Task Arithmetic (Ilharco et al., 2023, arXiv 2212.04089): theta_0 + lambda sum_t w_t tau_t;
    ``dare_drop`` p > 0 first sparsifies each tau_t by DARE."""
    taus = dare_rows(as_task_vectors(base, models), dare_drop, generator)
    return base + scaling * weighted_sum(weights, taus)


def agreeing_mean(taus: torch.Tensor, weights: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per entry, sum_t w_t [sign tau_t = gamma] tau_t / sum_t w_t [sign tau_t = gamma] (0 where no
    tau_t agrees), one task at a time."""
    numerator = torch.zeros_like(gamma)
    denominator = torch.zeros_like(gamma)
    for weight, tau in zip(weights, taus, strict=True):
        agree = (tau.sign() == gamma).to(tau.dtype).mul_(weight)
        numerator.addcmul_(agree, tau)
        denominator.add_(agree)
    return numerator.div_(denominator.clamp_min_(torch.finfo(gamma.dtype).tiny))


@merge_method("ties", knobs={"scaling": 1.0, "density": 0.2, "dare_drop": 0.0})
def ties(
    base: torch.Tensor,
    models: torch.Tensor,
    weights: torch.Tensor,
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
    taus = dare_rows(as_task_vectors(base, models), dare_drop, generator)
    for tau in taus:
        trim_to_top(tau, density)
    gamma = elected_sign(weighted_sum(weights, taus))
    return base + scaling * agreeing_mean(taus, weights, gamma)


@merge_method("sce", knobs={"scaling": 1.0, "select_topk": 1.0})
def sce(
    base: torch.Tensor,
    models: torch.Tensor,
    weights: torch.Tensor,
    *,
    scaling: float,
    select_topk: float,
    **_: object,
) -> torch.Tensor:
    """SCE (FuseChat, Wan et al., 2024, arXiv 2408.07990): select the top ``select_topk`` fraction of
    positions by across-task variance of tau; weights w_t = mean(tau_t^2) / sum_s mean(tau_s^2); TIES
    sign masks M_t = [sign tau_t = gamma]; tau = sum_t w_t M_t tau_t / max(sum_t w_t M_t, 1e-6)."""
    taus = as_task_vectors(base, models)
    if select_topk < 1.0 and taus.shape[0] > 1:
        mean = taus.mean(0)
        variance = torch.zeros_like(mean)
        for tau in taus:
            variance.add_((tau - mean).square_())
        keep = trim_to_top(variance, select_topk) != 0
        for tau in taus:
            tau.mul_(keep)
    energy = taus.reshape(taus.shape[0], -1).square().mean(1)
    w = energy / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
    gamma = elected_sign(taus.sum(0))
    numerator = torch.zeros_like(gamma)
    denominator = torch.zeros_like(gamma)
    for weight, tau in zip(w, taus, strict=True):
        mask = (tau.sign() == gamma).to(tau.dtype).mul_(weight)
        numerator.addcmul_(mask, tau)
        denominator.add_(mask)
    return base + scaling * numerator.div_(denominator.clamp_min_(1e-6))


@merge_method("pcb", knobs={"scaling": 1.0, "density": 0.2})
def pcb(
    base: torch.Tensor,
    models: torch.Tensor,
    weights: torch.Tensor,
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
    taus = as_task_vectors(base, models)
    taus.mul_(weights.reshape((-1,) + (1,) * (taus.dim() - 1)))
    count = taus.shape[0]

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x.div_(x.abs().max().clamp_min(torch.finfo(x.dtype).tiny))

    def softmax(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.flatten(), dim=0).reshape(x.shape)

    numerator = torch.zeros_like(taus[0])
    denominator = torch.zeros_like(taus[0])
    for tau in taus:
        balance = softmax(norm(tau * tau).mul_(count))
        inter = torch.zeros_like(tau)
        for other in taus:
            inter.add_(softmax(norm(tau * other)))
        balance.mul_(inter)
        balance.mul_(trim_to_top(balance.clone(), density) != 0)
        numerator.addcmul_(balance, tau)
        denominator.add_(balance)
    return base + scaling * numerator.div_(denominator.clamp_min_(1e-12))
