"""HDMoLE's home: its config and its registry entry (the layer math: ``ssvd_peft.layers.hdmole``
and ``.routing``; the model level, with the domain router: ``ssvd_peft.methods.hdmole_routing``).

One config holds everything HDMoLE takes: the experts and their routing, the global domain
router's source (``router_source``: it is attached at injection), the auxiliary loss weights a
training loop applies, and the names of the domain ids (``domains``).

Trainable parameters per in -> out layer (closed form), N experts of rank r:
    inner  N r in + N (in + 1) + (1 | in + 1)    expert A's, local router, threshold
    outer  N r out                               expert B's
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ssvd_peft.config import (
    AdapterConfig,
    PeftConfigError,
    check_choice,
    check_positive_int,
    is_positive_int,
    option,
)
from ssvd_peft.layers.base import TrainableSplit
from ssvd_peft.layers.hdmole import HdmoleAdapter
from ssvd_peft.methods.hdmole_routing import ROUTER_SIDES, DomainRouter
from ssvd_peft.methods.lora import LoraConfig, check_rank
from ssvd_peft.registry import Method, register_method

COMBINATIONS = ("product", "mix", "two_stage")
THRESHOLDS = ("learnable", "input")
SHARED_EXPERT = -1
UNLABELLED = "-"


@dataclass
class HdmoleConfig(LoraConfig):
    """HDMoLE: W x + sum_i w_i(x) (alpha / r) B_i A_i x over N LoRA experts tied to M domains.

    Experts are laid out domain by domain (experts_per_domain each), shared experts last; or
    given explicitly by ``expert_domains`` (one domain id per expert, -1 = shared).
    """

    method: ClassVar[str] = "hdmole"
    SHARED_FIELDS: ClassVar[tuple[str, ...]] = (
        *AdapterConfig.SHARED_FIELDS,
        "num_domains",
        "router_source",
        "router_side",
        "router_dim",
        "domain_weight",
        "balance_weight",
        "domains",
    )

    num_experts: int | None = option(
        "N LoRA experts per layer (default: num_domains * experts_per_domain + shared_experts)",
        default=None,
    )
    num_domains: int = option("M domains (accents) of the global domain router", default=2)
    experts_per_domain: int | None = option(
        "experts tied to each domain (default: (N - shared_experts) / M, or 1 without N)", default=None
    )
    shared_experts: int = option("experts that serve every domain (domain gate 1)", default=0)
    expert_domains: list[int] | None = option(
        "explicit expert -> domain map, one entry per expert, -1 = shared (replaces the two above)",
        default=None,
    )
    combination: str = option(
        "local x global routing: product (p g renormalised), mix (beta g + (1 - beta) p), "
        "two_stage (top-1 domain group, then p inside it)",
        default="product",
    )
    mix_beta: float = option("beta of combination 'mix'", default=0.5)
    threshold: str = option(
        "dynamic threshold: learnable (tau_max sigmoid(theta) per layer) or input "
        "(tau_max sigmoid(w . x + b) per token)",
        default="learnable",
    )
    tau_max: float | None = option("upper bound of the threshold (default: 1 / N)", default=None)
    router_source: str | None = option(
        "module whose input or output the global domain router mean-pools over time (attached at "
        "injection); none: g is uniform or set by hand (set_domain_probs)",
        default=None,
    )
    router_side: str = option("input | output of router_source", default="input")
    router_dim: int | None = option(
        "width of the router's features (default: from router_source: output_size() or its last "
        "Linear on the output side, its in_features if it is a Linear)",
        default=None,
    )
    domain_weight: float = option("weight of the domain loss: L + domain_weight L_dom + ...", default=0.5)
    balance_weight: float = option(
        "weight of the expert-balance loss: ... + balance_weight L_bal", default=0.01
    )
    domains: list[str] | None = option(
        "names of the domain ids 0 .. num_domains - 1 (single words; '-' marks an unlabelled utterance)",
        default=None,
    )

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.method, "num_domains", self.num_domains)
        if self.num_experts is not None:
            check_positive_int(self.method, "num_experts", self.num_experts)
        if self.experts_per_domain is not None:
            check_positive_int(self.method, "experts_per_domain", self.experts_per_domain)
        if self.shared_experts != 0 and not is_positive_int(self.shared_experts):
            raise PeftConfigError(
                f"hdmole: shared_experts must be an integer >= 0, got {self.shared_experts!r}"
            )
        check_choice(self.method, "combination", self.combination, COMBINATIONS)
        check_choice(self.method, "threshold", self.threshold, THRESHOLDS)
        if not 0.0 <= self.mix_beta <= 1.0:
            raise PeftConfigError(f"hdmole: mix_beta must be in [0, 1], got {self.mix_beta}")
        if self.tau_max is not None and not 0.0 < self.tau_max <= 1.0:
            raise PeftConfigError(f"hdmole: tau_max must be in (0, 1], got {self.tau_max}")
        check_choice(self.method, "router_side", self.router_side, ROUTER_SIDES)
        if self.router_dim is not None:
            check_positive_int(self.method, "router_dim", self.router_dim)
        if self.domain_weight < 0 or self.balance_weight < 0:
            raise PeftConfigError("hdmole: domain_weight and balance_weight must be >= 0")
        if self.domains is not None:
            self.domains = checked_domain_names(self.domains, self.num_domains)
        self.expert_domain_map()

    def expert_domain_map(self) -> list[int]:
        """pi: the domain id of every expert (SHARED_EXPERT = -1 for shared experts)."""
        if self.expert_domains is not None:
            return self._checked_explicit_map()
        shared, domains = self.shared_experts, self.num_domains
        per_domain = self.experts_per_domain
        if per_domain is None:
            per_domain = 1 if self.num_experts is None else (self.num_experts - shared) // domains
        total = domains * per_domain + shared
        if per_domain < 1 or (self.num_experts is not None and self.num_experts != total):
            raise PeftConfigError(
                f"hdmole: num_experts={self.num_experts} does not fit num_domains={domains} x "
                f"experts_per_domain={self.experts_per_domain} + shared_experts={shared}; "
                "set num_experts = num_domains * experts_per_domain + shared_experts, or leave it out"
            )
        return [d for d in range(domains) for _ in range(per_domain)] + [SHARED_EXPERT] * shared

    def _checked_explicit_map(self) -> list[int]:
        mapping = list(self.expert_domains or [])
        if self.experts_per_domain is not None or self.shared_experts:
            raise PeftConfigError(
                "hdmole: give either expert_domains or experts_per_domain / shared_experts, not both"
            )
        valid = set(range(-1, self.num_domains))
        if any(isinstance(d, bool) or d not in valid for d in mapping):
            raise PeftConfigError(
                f"hdmole: expert_domains entries must be domain ids in [0, {self.num_domains}) "
                f"or -1 (shared); got {mapping}"
            )
        missing = sorted(set(range(self.num_domains)) - set(mapping))
        if missing:
            raise PeftConfigError(
                f"hdmole: domains {missing} have no expert in expert_domains={mapping}; "
                "give every domain at least one expert or lower num_domains"
            )
        if self.num_experts is not None and self.num_experts != len(mapping):
            raise PeftConfigError(
                f"hdmole: num_experts={self.num_experts} but expert_domains has {len(mapping)} entries"
            )
        return mapping

    def build(self, base_layer: nn.Linear) -> HdmoleAdapter:
        check_rank(self, base_layer.in_features, base_layer.out_features)
        return HdmoleAdapter(
            base_layer,
            self.rank,
            self.alpha,
            self.expert_domain_map(),
            self.num_domains,
            self.dropout,
            self.use_rslora,
            self.combination,
            self.mix_beta,
            self.threshold,
            self.tau_max,
            self.init_weights,
        )

    def trainable_split(self, in_features: int, out_features: int) -> TrainableSplit:
        """inner: N r in + N (in + 1) + threshold (1 or in + 1); outer: N r out."""
        check_rank(self, in_features, out_features)
        experts = len(self.expert_domain_map())
        threshold = 1 if self.threshold == "learnable" else in_features + 1
        inner = experts * self.rank * in_features + experts * (in_features + 1) + threshold
        return TrainableSplit(inner=inner, outer=experts * self.rank * out_features)


def checked_domain_names(names: Any, num_domains: int) -> list[str]:
    """The ``domains`` list: one distinct single-word name per domain id, none an integer or '-'."""
    if not isinstance(names, list | tuple) or not names:
        raise PeftConfigError(f"hdmole: domains must be a list of domain names, got {names!r}")
    bad = [name for name in names if not isinstance(name, str) or name.split() != [name]]
    if bad:
        raise PeftConfigError(
            f"hdmole: domains must be single-word names (quote names YAML reads as numbers or "
            f"booleans), got {bad!r} in {list(names)!r}"
        )
    reserved = [name for name in names if name == UNLABELLED or is_domain_id(name)]
    if reserved:
        raise PeftConfigError(
            f"hdmole: {reserved} cannot be domain names ({UNLABELLED!r} marks an unlabelled "
            "utterance, integers are ids); rename them"
        )
    if len(set(names)) != len(names):
        raise PeftConfigError(f"hdmole: domains has repeated names: {list(names)}")
    if len(names) != num_domains:
        raise PeftConfigError(
            f"hdmole: domains names {len(names)} domains {list(names)} but num_domains is {num_domains}; "
            f"give one name per domain id 0 .. {num_domains - 1}"
        )
    return list(names)


def is_domain_id(text: str) -> bool:
    """Whether ``text`` is an integer (a domain id, as opposed to a name)."""
    return text.removeprefix("-").isdigit()


HDMOLE = register_method(Method("hdmole", HdmoleConfig, HdmoleAdapter, knob="rank", model_part=DomainRouter))
