"""Hierarchical routing of HDMoLE: a global domain router, local expert routers, dynamic thresholds.

For a batch of B utterances, N experts per layer and M domains (accents):

    g(u)  = softmax(W_g pool_t(h_t))                      global, one per model       (B, M)
    p_t   = softmax(l_t),  l_t = W_l x_t                  local, one per layer         (..., N)
    gate_i = g_{pi(i)}, 1 for shared experts (pi(i) = -1)
    q_t   = product:   p_t * gate / sum_j p_tj gate_j = softmax(l_t + log gate)      (spec option a)
            mix:       beta gate / sum_j gate_j + (1 - beta) p_t                     (spec option b)
            two_stage: the product with gate([g = max g]), a softmax of l_t over the top
                       domain's group                                                (spec option c)
    s_ti  = q_ti - tau,  m_ti = [s_ti > 0],  w_ti = s_ti m_ti / sum_j s_tj m_tj

product and two_stage are computed in log space, softmax(l_t + log gate) with log g from the
router's logits (log_softmax): the ratio form divides by a sum that float32 rounds to 0 (or to a
denormal whose reciprocal overflows in the backward) once the local router favours experts of
another domain by about 90 logits.

A token that no expert passes keeps argmax_i q_ti with weight 1, so no token is ever dropped.
(The spec writes m = [s >= 0]; the weight s m is the same, only q = tau exactly differs.)
two_stage routes inside the top-1 domain's group (tied domains all keep their groups, so a
uniform g uses every expert); the argmax has no gradient, so the global router then learns
from L_dom alone.

``RoutingContext`` carries g from the global router (``ssvd_peft.methods.hdmole_routing``) or
from ``set_domain_probs`` to every HDMoLE layer of one adapter; without g every domain gets 1 / M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


class RoutingContext:
    """The current batch's domain probabilities g (B, M), read by every HDMoLE layer of one adapter.

    ``domain_logits`` is the global router's pre-softmax output (for L_dom); it is None when g
    was set by hand or not at all.
    """

    def __init__(self, num_domains: int) -> None:
        self.num_domains = num_domains
        self.domain_probs: torch.Tensor | None = None
        self.domain_logits: torch.Tensor | None = None

    def set(self, probs: torch.Tensor | None, logits: torch.Tensor | None = None) -> None:
        """Route the next forwards with g = ``probs`` (B, M); None goes back to uniform g."""
        if probs is not None and (probs.dim() != 2 or probs.shape[1] != self.num_domains):
            raise ValueError(
                f"domain probabilities must have shape (batch, {self.num_domains}), got {tuple(probs.shape)}"
            )
        self.domain_probs = probs
        self.domain_logits = logits

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep the domain count, not the batch's g (it may hold a graph)."""
        return {"num_domains": self.num_domains, "domain_probs": None, "domain_logits": None}

    def log_probs_for(self, x: torch.Tensor) -> torch.Tensor:
        """log g shaped (B, 1, ..., 1, M) to broadcast over a batch-first input x (B, ..., in):
        log_softmax of the router's logits (exact where g underflows), else the log of g."""
        middle = (1,) * (x.dim() - 2)
        if self.domain_probs is None:
            uniform = x.new_full((self.num_domains,), -math.log(self.num_domains))
            return uniform.view(*(1,) * (x.dim() - 1), self.num_domains)
        if x.dim() < 2 or self.domain_probs.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"the domain probabilities are for a batch of {self.domain_probs.shape[0]} utterances but "
                f"an HDMoLE layer got an input of shape {tuple(x.shape)}; HDMoLE layers take batch-first "
                "inputs (B, ..., in). Set the probabilities of the batch being run (run the domain "
                "router on it or call set_domain_probs), or set_domain_probs(model, None) for uniform g"
            )
        if self.domain_logits is not None:
            log_probs = self.domain_logits.log_softmax(dim=-1)
        else:
            log_probs = _log(self.domain_probs)
        log_probs = log_probs.to(device=x.device, dtype=x.dtype)
        return log_probs.view(log_probs.shape[0], *middle, self.num_domains)


def _log(values: torch.Tensor) -> torch.Tensor:
    """log, with -inf for 0 and a zero (not NaN) gradient there."""
    positive = values > 0
    return torch.where(positive, torch.where(positive, values, 1.0).log(), -math.inf)


def masked_mean_pool(features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """pool_t(h_t) = sum_{t < len} h_t / len over (B, T, d) features; (B, d) passes through."""
    if features.dim() == 2:
        return features
    if lengths is None:
        return features.mean(dim=1)
    steps = torch.arange(features.shape[1], device=features.device)
    mask = (steps[None, :] < lengths[:, None]).to(features.dtype)
    total = (features * mask.unsqueeze(-1)).sum(dim=1)
    return total / mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def domain_gate(
    domain_values: torch.Tensor, expert_domain: torch.Tensor, shared: float = 1.0
) -> torch.Tensor:
    """gate_i = v_{pi(i)} (``shared`` for shared experts, pi(i) = -1): (..., M) -> (..., N)."""
    padded = torch.cat([domain_values, torch.full_like(domain_values[..., :1], shared)], dim=-1)
    index = torch.where(expert_domain < 0, domain_values.shape[-1], expert_domain)
    return padded.index_select(-1, index)


def combine_routes(
    local_logits: torch.Tensor,
    domain_log_probs: torch.Tensor,
    expert_domain: torch.Tensor,
    combination: str,
    mix_beta: float = 0.5,
) -> torch.Tensor:
    """q (..., N) from the local logits l (..., N) and the broadcastable global log g (..., M);
    see the module doc."""
    if combination == "mix":
        gate = domain_gate(domain_log_probs.exp(), expert_domain)
        return mix_beta * gate / gate.sum(dim=-1, keepdim=True) + (1.0 - mix_beta) * local_logits.softmax(-1)
    if combination == "two_stage":
        top = domain_log_probs == domain_log_probs.amax(dim=-1, keepdim=True)
        domain_log_probs = torch.where(top, 0.0, -math.inf).to(local_logits.dtype)
    log_gate = domain_gate(domain_log_probs, expert_domain, shared=0.0)
    return (local_logits + log_gate).softmax(dim=-1)


def threshold_weights(routes: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, m): w_ti = s_ti m_ti / sum_j s_tj m_tj with s = q - tau, m = [s > 0]; argmax q if none passes."""
    scores = routes - tau
    passed = scores > 0
    none_passed = ~passed.any(dim=-1, keepdim=True)
    top = F.one_hot(routes.argmax(dim=-1), routes.shape[-1]).bool()
    kept = torch.where(passed, scores, 0.0)
    total = kept.sum(dim=-1, keepdim=True)
    weights = kept / torch.where(none_passed, 1.0, total)
    weights = torch.where(none_passed, top.to(routes.dtype), weights)
    return weights, passed | (none_passed & top)


@dataclass
class RoutingRecord:
    """What one layer's latest forward routed, over all its T tokens.

    expert_probs: P_i = mean_t p_ti (local router, keeps its graph for the balance loss);
    dispatch: f_i = sum_t m_ti / sum_tj m_tj, the share of active (token, expert) pairs;
    active_experts: mean_t k_t; entropy: mean_t H(q_t) in nats.
    """

    expert_probs: torch.Tensor
    dispatch: torch.Tensor
    active_experts: torch.Tensor
    entropy: torch.Tensor

    @classmethod
    def of(cls, local_probs: torch.Tensor, routes: torch.Tensor, active: torch.Tensor) -> RoutingRecord:
        num_experts = local_probs.shape[-1]
        active = active.reshape(-1, num_experts).to(local_probs.dtype)
        routes = routes.detach().reshape(-1, num_experts)
        entropy = -(routes * routes.clamp_min(torch.finfo(routes.dtype).tiny).log()).sum(dim=-1)
        return cls(
            expert_probs=local_probs.reshape(-1, num_experts).mean(dim=0),
            dispatch=active.sum(dim=0) / active.sum().clamp_min(1.0),
            active_experts=active.sum(dim=-1).mean(),
            entropy=entropy.mean(),
        )

    def balance_loss(self) -> torch.Tensor:
        """Switch-style N sum_i f_i P_i; 1 at perfect balance."""
        return self.expert_probs.numel() * (self.dispatch * self.expert_probs).sum()


IGNORE_DOMAIN = -100


def domain_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_dom = mean over labelled utterances of -log g_label; 0 when no label is known (IGNORE_DOMAIN)."""
    labels = labels.to(logits.device)
    if not (labels != IGNORE_DOMAIN).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_DOMAIN)
