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

Model level: ``attach_domain_router`` adds the global router (optionally hooked to a module's
input or output), ``set_domain_probs`` sets g by hand (e.g. one-hot labels), and
``hdmole_aux_losses`` / ``hdmole_statistics`` read the latest forward of every HDMoLE layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssvd_peft.layers.base import ADAPTERS_ATTR, Adapter, AdapterLinear, compute_dtype
from ssvd_peft.layers.routing import (
    IGNORE_DOMAIN,
    DomainRouter,
    RoutingContext,
    RoutingRecord,
    combine_routes,
    domain_cross_entropy,
    threshold_weights,
)


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


def hdmole_adapters(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, HdmoleAdapter]]:
    """(module name, adapter) for every HDMoLE adapter named ``adapter_name`` in ``model``."""
    found = [
        (name, adapter)
        for name, module in model.named_modules()
        if (adapter := _hdmole_adapter_of(module, adapter_name)) is not None
    ]
    if not found:
        raise ValueError(
            f"the model has no HDMoLE adapter named {adapter_name!r}; "
            "inject one with inject_adapters(model, 'hdmole', target_modules=[...])"
        )
    return found


def _hdmole_adapter_of(module: nn.Module, adapter_name: str) -> HdmoleAdapter | None:
    if not isinstance(module, AdapterLinear) or adapter_name not in module.peft_adapters:
        return None
    adapter = module.peft_adapters[adapter_name]
    return adapter if isinstance(adapter, HdmoleAdapter) else None


def routing_context(model: nn.Module, adapter_name: str = "default") -> RoutingContext:
    """The one RoutingContext shared by all HDMoLE layers of ``adapter_name`` (bound on first use)."""
    adapters = hdmole_adapters(model, adapter_name)
    context = adapters[0][1].context
    for name, adapter in adapters:
        if adapter.num_domains != context.num_domains:
            raise ValueError(
                f"module {name!r} has num_domains={adapter.num_domains} but other HDMoLE layers of "
                f"adapter {adapter_name!r} have {context.num_domains}; one domain router serves them "
                "all, so num_domains must not differ per module"
            )
        adapter.context = context
    return context


def set_domain_probs(model: nn.Module, probs: torch.Tensor | None, adapter_name: str = "default") -> None:
    """Route the next forwards with domain probabilities ``probs`` (B, M), e.g. one-hot labels;
    None: the global router's next output, or uniform g without a router."""
    routing_context(model, adapter_name).set(probs)


def attach_domain_router(
    model: nn.Module,
    feature_dim: int,
    adapter_name: str = "default",
    source_module: str | None = None,
    source_side: str = "input",
) -> DomainRouter:
    """Add the global domain router of adapter ``adapter_name`` as ``model.peft_adapters[adapter_name]``.

    Its parameters sit under ``peft_adapters.<adapter_name>.`` like every adapter parameter, so
    freezing and adapter-only state dicts keep them. With ``source_module`` a hook runs the
    router on that module's input (``source_side="input"``, before it runs: the HDMoLE layers
    inside it see g) or output (``"output"``: for HDMoLE layers after it), taking the first
    (B, T, feature_dim) tensor as features and a following (B,) integer tensor as lengths (or,
    without one, a (B, 1, T) boolean padding mask).
    Without it, call ``router(features, lengths)`` before the model's forward.
    """
    if source_side not in ("input", "output"):
        raise ValueError(f"source_side must be 'input' or 'output', got {source_side!r}")
    if isinstance(model, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        raise TypeError(
            f"attach_domain_router adds the router as a submodule of the model, and a "
            f"{type(model).__name__} would run or list it as one of its own layers; "
            "wrap the container in an nn.Module and attach the router to that"
        )
    context = routing_context(model, adapter_name)
    container = getattr(model, ADAPTERS_ATTR, None)
    if container is None:
        container = nn.ModuleDict()
        setattr(model, ADAPTERS_ATTR, container)
    if not isinstance(container, nn.ModuleDict) or adapter_name in container:
        raise ValueError(
            f"the model already has {ADAPTERS_ATTR}.{adapter_name} (or a {ADAPTERS_ATTR} attribute "
            "of its own); detach_domain_router(model, adapter_name) first"
        )
    reference = hdmole_adapters(model, adapter_name)[0][1].lora_A
    router = DomainRouter(feature_dim, context.num_domains, context).to(reference.device, reference.dtype)
    container[adapter_name] = router
    router.source_module, router.source_side = source_module, source_side
    if source_module is not None:
        source = model.get_submodule(source_module)
        if source_side == "input":
            router.source_hook = source.register_forward_pre_hook(router.route_inputs, with_kwargs=True)
        else:
            router.source_hook = source.register_forward_hook(router.route_outputs)
    return router


def domain_router(model: nn.Module, adapter_name: str = "default") -> DomainRouter | None:
    """The global domain router attached for ``adapter_name``, if any."""
    container = getattr(model, ADAPTERS_ATTR, None)
    if not isinstance(container, nn.ModuleDict) or adapter_name not in container:
        return None
    router = container[adapter_name]
    return router if isinstance(router, DomainRouter) else None


def detach_domain_router(model: nn.Module, adapter_name: str = "default") -> None:
    """Remove the global domain router (and its hook); the layers fall back to uniform g."""
    router = domain_router(model, adapter_name)
    if router is None:
        return
    handle = getattr(router, "source_hook", None)
    if handle is not None:
        handle.remove()
    del getattr(model, ADAPTERS_ATTR)[adapter_name]
    router.context.set(None)


def merge_domain_experts(model: nn.Module, domain: int, adapter_name: str = "default") -> None:
    """Fold the fixed-domain update delta W_d of every HDMoLE layer into its base weight.

    The model then runs at the speed of the base model and computes, for domain ``domain``,
    the routed output with g = e_d and uniform local routing (see the module docstring).
    ``unmerge_adapters`` restores the base weights; ``merge_and_unload`` keeps W + delta W_d.
    """
    num_domains = routing_context(model, adapter_name).num_domains
    if not 0 <= domain < num_domains:
        raise ValueError(f"domain must be in [0, {num_domains}) for adapter {adapter_name!r}, got {domain}")
    for name, adapter in hdmole_adapters(model, adapter_name):
        module = model.get_submodule(name)
        module.set_adapter(adapter_name)
        module.unmerge()
        adapter.merge_domain(module.base_layer, domain)
        module.merged_adapter = adapter_name


def hdmole_aux_losses(
    model: nn.Module, domain_labels: torch.Tensor | None = None, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """{"balance": mean over layers of N sum_i f_i P_i, "domain": CE(g logits, labels)} of the
    latest forward; "domain" only with ``domain_labels`` (B,), where IGNORE_DOMAIN marks unknown.

    Use as L = L_asr + l_dom * losses["domain"] + l_bal * losses["balance"].
    """
    adapters = hdmole_adapters(model, adapter_name)
    records = [adapter.last_routing for _, adapter in adapters]
    if any(record is None for record in records):
        raise RuntimeError(
            "no routing recorded yet: run the model's forward before asking for the HDMoLE losses"
        )
    losses = {"balance": torch.stack([record.balance_loss() for record in records]).mean()}
    if domain_labels is not None:
        logits = routing_context(model, adapter_name).domain_logits
        if logits is None:
            raise RuntimeError(
                "no domain router output for this batch: attach_domain_router(model, feature_dim, ...) "
                "and run the forward (or call the router) before asking for the domain loss"
            )
        losses["domain"] = domain_cross_entropy(logits, domain_labels)
    return losses


def hdmole_statistics(
    model: nn.Module, domain_labels: torch.Tensor | None = None, adapter_name: str = "default"
) -> dict[str, float]:
    """Routing statistics of the latest forward.

    ``<layer>.active_experts`` (mean_t k_t), ``<layer>.routing_entropy`` (mean_t H(q_t), nats),
    their means over layers (``active_experts``, ``routing_entropy``) and, with labels and a
    g for the batch, ``domain_accuracy`` (argmax g = label over the labelled utterances).
    """
    stats: dict[str, float] = {}
    for name, adapter in hdmole_adapters(model, adapter_name):
        if adapter.last_routing is not None:
            stats[f"{name}.active_experts"] = float(adapter.last_routing.active_experts)
            stats[f"{name}.routing_entropy"] = float(adapter.last_routing.entropy)
    for key in ("active_experts", "routing_entropy"):
        values = [value for name, value in stats.items() if name.endswith(f".{key}")]
        if values:
            stats[key] = sum(values) / len(values)
    probs = routing_context(model, adapter_name).domain_probs
    if domain_labels is not None and probs is not None:
        labels = domain_labels.to(probs.device)
        labelled = labels != IGNORE_DOMAIN
        if labelled.any():
            stats["domain_accuracy"] = float((probs.argmax(dim=-1) == labels)[labelled].float().mean())
    return stats
