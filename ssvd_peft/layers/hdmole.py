"""HDMoLE: LoRA experts with hierarchical (domain, expert) routing and dynamic thresholds.

Mu et al., ICASSP 2025, arXiv 2409.19878; the threshold follows AdaMoLE, arXiv 2405.00361.

    y = x W^T + b + sum_i w_i(x) E_i(x),   E_i(x) = (alpha / r) B_i A_i dropout(x)

over N LoRA experts (A_i in R^{r x in} kaiming-uniform, B_i in R^{out x r} zero, so the layer
starts as the identity). The weights w(x) come from the local router, the global domain
router's g and the threshold tau (see ``ssvd_peft.layers.routing``):

    tau = tau_max sigmoid(theta)              threshold: learnable (theta starts at 0)
    tau(x) = tau_max sigmoid(w . x + b)       threshold: input     (w, b start at 0)

All experts run densely from stacked factors, one GEMM each:
h = dropout(x) [A_1; ...; A_N]^T (..., N r), y += (alpha / r) (w ⊙ h) [B_1, ..., B_N]^T.

Trainable parameters per in -> out layer (closed form):

    inner  N r in + N (in + 1) + (1 | in + 1)    expert A's, local router, threshold
    outer  N r out                               expert B's

The routed update depends on every token's input, so it is not one weight matrix and
``merge`` refuses. A deployment on one known domain d merges the FIXED-DOMAIN update

    delta W_d = (alpha / r) sum_{i in G_d} B_i A_i / |G_d|,   G_d = {i : pi(i) = d or shared},

which is exactly the layer's routed output when g = e_d (one-hot) and the local router is
bypassed (p uniform): then q = 1 / |G_d| on G_d, all of G_d pass any tau < 1 / |G_d| (always
true for the default tau_max = 1 / N) with equal weights. This holds for the combinations
product and two_stage; for mix it is the beta = 1 case.

The model level (the global domain router, setting g by hand, the fixed-domain merge, the
auxiliary losses and statistics) is in ``ssvd_peft.methods.hdmole_routing``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.layers.base import Adapter, compute_dtype
from ssvd_peft.layers.routing import RoutingContext, RoutingRecord, combine_routes, threshold_weights


class RoutedMergeError(RuntimeError):
    """An input-routed adapter asked for one weight matrix it does not have."""


MERGE_REFUSAL = (
    "HDMoLE weighs its experts per token from the input (local router, domain router, dynamic "
    "threshold), so its update is not one weight matrix and cannot be merged exactly. For a "
    "deployment on one known domain, fold that domain's experts into the base weight with "
    "merge_domain_experts(model, domain) (one layer: adapter.merge_domain(base_layer, domain)); "
    "otherwise run the adapter unmerged."
)


class HdmoleAdapter(Adapter):
    """N LoRA experts weighted per token by hierarchical routing and a dynamic threshold.

    ``expert_domains``: the domain id of every expert (-1: shared), so N = len(expert_domains);
    ``tau_max``: the threshold's upper bound (None: 1 / N, below the largest routing weight, so
    some expert always passes).
    """

    exact_merge = False

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        expert_domains: list[int],
        num_domains: int,
        dropout: float = 0.0,
        use_rslora: bool = False,
        combination: str = "product",
        mix_beta: float = 0.5,
        threshold: str = "learnable",
        tau_max: float | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.num_experts = len(expert_domains)
        self.num_domains = num_domains
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.combination = combination
        self.mix_beta = mix_beta
        self.tau_max = 1.0 / self.num_experts if tau_max is None else tau_max
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_features, out_features = base_layer.in_features, base_layer.out_features
        factory = {"dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        self.lora_A = nn.Parameter(torch.empty(self.num_experts, rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.num_experts, out_features, rank, **factory))
        self.router = nn.Linear(in_features, self.num_experts, **factory)
        self.threshold_theta = nn.Parameter(torch.empty((), **factory)) if threshold == "learnable" else None
        self.threshold_proj = nn.Linear(in_features, 1, **factory) if threshold == "input" else None
        self.register_buffer(
            "expert_domain", torch.tensor(expert_domains, device=factory["device"]), persistent=False
        )
        self.context = RoutingContext(num_domains)
        self.last_routing: RoutingRecord | None = None
        self.merged_domain: int | None = None
        self.initialize(init_weights)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles drop the latest routing record (it may hold a graph)."""
        return {**self.__dict__, "last_routing": None}

    def initialize(self, init_weights: bool) -> None:
        """A_i kaiming-uniform; B_i zero (``init_weights``: the identity) or random; threshold at
        tau_max / 2."""
        for expert_A in self.lora_A.data:
            nn.init.kaiming_uniform_(expert_A, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.normal_(self.lora_B, std=1.0 / self.rank)
        if self.threshold_theta is not None:
            nn.init.zeros_(self.threshold_theta)
        if self.threshold_proj is not None:
            nn.init.zeros_(self.threshold_proj.weight)
            nn.init.zeros_(self.threshold_proj.bias)

    def threshold(self, x: torch.Tensor) -> torch.Tensor:
        """tau = tau_max sigmoid(theta) (scalar) or tau_max sigmoid(w . x + b) (..., 1)."""
        if self.threshold_proj is not None:
            return self.tau_max * torch.sigmoid(self.threshold_proj(x))
        return self.tau_max * torch.sigmoid(self.threshold_theta)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """w (..., N): the experts' weights for every token; records the routing statistics."""
        local_logits = self.router(x)
        domain_log_probs = self.context.log_probs_for(x)
        routes = combine_routes(
            local_logits, domain_log_probs, self.expert_domain, self.combination, self.mix_beta
        )
        weights, active = threshold_weights(routes, self.threshold(x))
        self.last_routing = RoutingRecord.of(local_logits.softmax(dim=-1), routes, active)
        return weights

    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        weights = self.route(x)
        hidden = F.linear(self.dropout(x), self.lora_A.flatten(0, 1))
        hidden = hidden.unflatten(-1, (self.num_experts, self.rank)) * weights.unsqueeze(-1)
        stacked_B = self.lora_B.permute(1, 0, 2).flatten(1)
        return base_layer(x) + self.scaling * F.linear(hidden.flatten(-2), stacked_B)

    def domain_weights(self, domain: int) -> torch.Tensor:
        """(N,): 1 / |G_d| on G_d = the experts of ``domain`` and the shared experts, 0 elsewhere."""
        if not 0 <= domain < self.num_domains:
            raise ValueError(f"domain must be in [0, {self.num_domains}), got {domain}")
        group = ((self.expert_domain == domain) | (self.expert_domain < 0)).to(self.lora_A.dtype)
        return group / group.sum()

    def domain_delta_weight(self, domain: int) -> torch.Tensor:
        """delta W_d = (alpha / r) sum_i w_d,i B_i A_i with w_d = ``domain_weights(domain)``, in float32+."""
        dtype = compute_dtype(self.lora_A.dtype)
        weights = self.domain_weights(domain).to(dtype)
        return self.scaling * torch.einsum(
            "n,nor,nri->oi", weights, self.lora_B.to(dtype), self.lora_A.to(dtype)
        )

    def task_deltas(self, base_layer: nn.Linear) -> list[torch.Tensor]:
        """[delta W_0, .., delta W_{D-1}]: every domain's fixed update (``domain_delta_weight``)."""
        return [self.domain_delta_weight(domain) for domain in range(self.num_domains)]

    def merge_domain(self, base_layer: nn.Linear, domain: int) -> None:
        """W <- W + delta W_d: the layer for one known domain at the cost of a plain Linear."""
        if self.merged_domain is not None:
            raise RuntimeError(
                f"domain {self.merged_domain} is already merged into this layer; unmerge it first"
            )
        weight = base_layer.weight
        dtype = compute_dtype(weight.dtype)
        weight.data.copy_(weight.detach().to(dtype) + self.domain_delta_weight(domain).detach().to(dtype))
        self.merged_domain = domain

    def merge_into(self, base_layer: nn.Linear) -> None:
        raise RoutedMergeError(MERGE_REFUSAL)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        raise RoutedMergeError(MERGE_REFUSAL)

    def unmerged_weight(self, merged_weight: torch.Tensor) -> torch.Tensor:
        """W = W' - delta W_d of the merged domain."""
        dtype = compute_dtype(merged_weight.dtype)
        delta = self.domain_delta_weight(self.merged_domain).detach().to(dtype)
        return (merged_weight.detach().to(dtype) - delta).to(merged_weight.dtype)

    def unmerge_from(self, base_layer: nn.Linear) -> None:
        """Subtract the merged fixed-domain update again."""
        if self.merged_domain is None:
            return
        super().unmerge_from(base_layer)
        self.merged_domain = None
