"""Typed, validated configurations of every adapter method.

A configuration says WHERE adapters go (``target_modules``, ``exclude_modules``), HOW each
one is built (the method's options) and how options differ per module
(``module_overrides``: ``{pattern: {option: value}}``, applied in order to the modules a
pattern matches). ``config_from_dict("ssvd_o", {...})`` builds one from a YAML block and
rejects unknown methods, unknown options and out-of-range values with one clear message.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ssvd_peft.targets import matches


class PeftConfigError(ValueError):
    """A configuration that cannot be built; the message says what is wrong and how to fix it."""


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class AdapterConfig:
    """Options shared by every method."""

    method: ClassVar[str] = ""

    target_modules: list[str] = _help(
        "module names to adapt: dot-suffixes (linear_q) or regexes matching the full name",
        default_factory=list,
    )
    exclude_modules: list[str] = _help(
        "module names never to adapt, in the same syntax", default_factory=list
    )
    module_overrides: dict[str, dict[str, Any]] = _help(
        "per-module option changes: {pattern: {option: value}}, applied in order",
        default_factory=dict,
    )
    init_weights: bool = _help(
        "True: the adapter starts as the identity; False: random non-trivial adapter (tests)",
        default=True,
    )

    SHARED_FIELDS: ClassVar[tuple[str, ...]] = (
        "target_modules",
        "exclude_modules",
        "module_overrides",
        "init_weights",
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]
        self.target_modules = list(self.target_modules)
        self.exclude_modules = list(self.exclude_modules)
        if not self.target_modules:
            raise PeftConfigError(
                f"{self.method}: target_modules is empty; name the nn.Linear modules to adapt, "
                "e.g. target_modules: [linear_q, linear_v, w_1, w_2]"
            )
        if not isinstance(self.module_overrides, dict):
            raise PeftConfigError(
                f"{self.method}: module_overrides must be a mapping {{pattern: {{option: value}}}}, "
                f"got {self.module_overrides!r}"
            )
        for pattern, overrides in self.module_overrides.items():
            if not isinstance(overrides, dict):
                raise PeftConfigError(
                    f"{self.method}: module_overrides[{pattern!r}] must be a mapping "
                    "{option: value}, got " + repr(overrides)
                )
            _reject_unknown(self.method, overrides, self.layer_options(), "module_overrides")
        self.validate()
        for pattern, overrides in self.module_overrides.items():
            try:
                dataclasses.replace(self, module_overrides={}, **overrides)
            except PeftConfigError as error:
                raise PeftConfigError(f"module_overrides[{pattern!r}]: {error}") from None

    def validate(self) -> None:
        """Check the method's options; subclasses raise PeftConfigError on bad values."""

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def layer_options(cls) -> list[str]:
        """Options that shape one layer's adapter (the ones module_overrides may change)."""
        return [name for name in cls.option_names() if name not in cls.SHARED_FIELDS]

    def for_module(self, module_name: str) -> AdapterConfig:
        """This config with every override whose pattern matches ``module_name`` applied."""
        changes: dict[str, Any] = {}
        for pattern, overrides in self.module_overrides.items():
            if matches(pattern, module_name):
                changes.update(overrides)
        if not changes:
            return self
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: W x + (alpha / r) B A dropout(x)."""

    method: ClassVar[str] = "lora"

    rank: int = _help("rank r of the update B A", default=8)
    alpha: float = _help("scaling numerator: scale = alpha / r (alpha / sqrt(r) with rsLoRA)", default=16.0)
    dropout: float = _help("dropout on the adapter input", default=0.0)
    use_rslora: bool = _help("rank-stabilised scaling alpha / sqrt(r)", default=False)

    def validate(self) -> None:
        _check_positive_int(self.method, "rank", self.rank)
        if not self.alpha > 0:
            raise PeftConfigError(f"{self.method}: alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftConfigError(f"{self.method}: dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


@dataclass
class DoraConfig(LoraConfig):
    """DoRA: m * (W + scale B A) / ||W + scale B A||_row, norm detached in backward."""

    method: ClassVar[str] = "dora"


SVD_METHODS = ("full", "randomized")


@dataclass
class PissaConfig(LoraConfig):
    """PiSSA: LoRA initialised from the top-r singular triplets on the residual weight."""

    method: ClassVar[str] = "pissa"

    svd_method: str = _help("'full' SVD or 'randomized' (torch.svd_lowrank)", default="full")
    svd_niter: int = _help("subspace iterations of the randomized SVD", default=4)

    def validate(self) -> None:
        super().validate()
        _check_choice(self.method, "svd_method", self.svd_method, SVD_METHODS)
        _check_positive_int(self.method, "svd_niter", self.svd_niter)


ROTATIONS = ("cayley", "neumann", "expm")


@dataclass
class SsvdConfig(AdapterConfig):
    """SSVD: shift the top-k singular values and rotate the first k_in right singular vectors."""

    method: ClassVar[str] = "ssvd"

    k: int | None = _help("size of the adapted singular subspace (default: k_ratio * m)", default=None)
    k_ratio: float = _help("k as a fraction of m = min(in, out) when k is not given", default=0.4)
    k_in: int | None = _help("size of the inner (input-side) rotation (default: k)", default=None)
    rotation: str = _help("skew -> orthogonal map: cayley (exact), neumann, expm", default="cayley")
    neumann_terms: int = _help(
        "highest power n of the truncated Neumann series (rotation: neumann)", default=4
    )
    espnet_compat: bool = _help(
        "reproduce ESPnet master's SSVDLinear: rotation I + 2S, sigmoid gate on the shift, "
        "rotate the smaller side",
        default=False,
    )

    def validate(self) -> None:
        if self.k is not None:
            _check_positive_int(self.method, "k", self.k)
        if not 0.0 < self.k_ratio <= 1.0:
            raise PeftConfigError(f"{self.method}: k_ratio must be in (0, 1], got {self.k_ratio}")
        if self.k_in is not None:
            _check_positive_int(self.method, "k_in", self.k_in)
        _check_choice(self.method, "rotation", self.rotation, ROTATIONS)
        _check_positive_int(self.method, "neumann_terms", self.neumann_terms)


@dataclass
class SsvdOConfig(SsvdConfig):
    """SSVD-O: SSVD plus an outer (output-side) rotation; a rotation budget split by outer_share."""

    method: ClassVar[str] = "ssvd_o"

    k_out: int | None = _help(
        "size of the outer (output-side) rotation (default: from the budget)", default=None
    )
    outer_share: float = _help("share rho of the rotation budget given to the outer side", default=0.5)
    rotation_budget: int | None = _help(
        "rotation parameters per layer split between inner and outer (default: k(k-1)/2)",
        default=None,
    )

    def validate(self) -> None:
        super().validate()
        if self.espnet_compat:
            raise PeftConfigError(
                "ssvd_o: espnet_compat reproduces ESPnet's SSVDLinear, which has no outer rotation; "
                "use method 'ssvd' with espnet_compat: true"
            )
        if self.k_out is not None:
            _check_positive_int(self.method, "k_out", self.k_out)
        if not 0.0 <= self.outer_share <= 1.0:
            raise PeftConfigError(f"ssvd_o: outer_share must be in [0, 1], got {self.outer_share}")
        if self.rotation_budget is not None and (
            not isinstance(self.rotation_budget, int) or self.rotation_budget < 0
        ):
            raise PeftConfigError(
                f"ssvd_o: rotation_budget must be an integer >= 0, got {self.rotation_budget!r}"
            )


COMBINATIONS = ("product", "mix", "two_stage")
THRESHOLDS = ("learnable", "input")
SHARED_EXPERT = -1


@dataclass
class HdmoleConfig(LoraConfig):
    """HDMoLE: W x + sum_i w_i(x) (alpha / r) B_i A_i x over N LoRA experts tied to M domains.

    Experts are laid out domain by domain (experts_per_domain each), shared experts last; or
    given explicitly by ``expert_domains`` (one domain id per expert, -1 = shared).
    """

    method: ClassVar[str] = "hdmole"

    num_experts: int | None = _help(
        "N LoRA experts per layer (default: num_domains * experts_per_domain + shared_experts)",
        default=None,
    )
    num_domains: int = _help("M domains (accents) of the global domain router", default=2)
    experts_per_domain: int | None = _help(
        "experts tied to each domain (default: (N - shared_experts) / M, or 1 without N)", default=None
    )
    shared_experts: int = _help("experts that serve every domain (domain gate 1)", default=0)
    expert_domains: list[int] | None = _help(
        "explicit expert -> domain map, one entry per expert, -1 = shared (replaces the two above)",
        default=None,
    )
    combination: str = _help(
        "local x global routing: product (p g renormalised), mix (beta g + (1 - beta) p), "
        "two_stage (top-1 domain group, then p inside it)",
        default="product",
    )
    mix_beta: float = _help("beta of combination 'mix'", default=0.5)
    threshold: str = _help(
        "dynamic threshold: learnable (tau_max sigmoid(theta) per layer) or input "
        "(tau_max sigmoid(w . x + b) per token)",
        default="learnable",
    )
    tau_max: float | None = _help("upper bound of the threshold (default: 1 / N)", default=None)

    def validate(self) -> None:
        super().validate()
        _check_positive_int(self.method, "num_domains", self.num_domains)
        if self.num_experts is not None:
            _check_positive_int(self.method, "num_experts", self.num_experts)
        if self.experts_per_domain is not None:
            _check_positive_int(self.method, "experts_per_domain", self.experts_per_domain)
        if self.shared_experts != 0 and not _is_positive_int(self.shared_experts):
            raise PeftConfigError(
                f"hdmole: shared_experts must be an integer >= 0, got {self.shared_experts!r}"
            )
        _check_choice(self.method, "combination", self.combination, COMBINATIONS)
        _check_choice(self.method, "threshold", self.threshold, THRESHOLDS)
        if not 0.0 <= self.mix_beta <= 1.0:
            raise PeftConfigError(f"hdmole: mix_beta must be in [0, 1], got {self.mix_beta}")
        if self.tau_max is not None and not 0.0 < self.tau_max <= 1.0:
            raise PeftConfigError(f"hdmole: tau_max must be in (0, 1], got {self.tau_max}")
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

    @property
    def resolved_tau_max(self) -> float:
        """tau_max, by default 1 / N: below the largest routing weight, so some expert always passes."""
        return 1.0 / len(self.expert_domain_map()) if self.tau_max is None else self.tau_max


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    cls.method: cls for cls in (LoraConfig, DoraConfig, PissaConfig, SsvdConfig, SsvdOConfig, HdmoleConfig)
}


def config_from_dict(method: str, options: dict[str, Any] | None) -> AdapterConfig:
    """Build the config of ``method`` from a mapping (for example a YAML ``peft_conf`` block)."""
    config_class = config_class_for(method)
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise PeftConfigError(f"{method}: options must be a mapping {{option: value}}, got {options!r}")
    _reject_unknown(method, options, config_class.option_names(), "option")
    return config_class(**options)


def config_class_for(method: str) -> type[AdapterConfig]:
    if method not in CONFIG_CLASSES:
        close = difflib.get_close_matches(str(method), list(CONFIG_CLASSES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PeftConfigError(
            f"unknown adapter method {method!r}; choose one of {', '.join(CONFIG_CLASSES)}.{hint}"
        )
    return CONFIG_CLASSES[method]


def _reject_unknown(method: str, options: dict[str, Any], known: list[str], what: str) -> None:
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PeftConfigError(f"{method}: unknown {what} {name!r}.{hint} Valid: {', '.join(known)}")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_positive_int(method: str, name: str, value: Any) -> None:
    if not _is_positive_int(value):
        raise PeftConfigError(f"{method}: {name} must be a positive integer, got {value!r}")


def _check_choice(method: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PeftConfigError(f"{method}: {name} must be one of {', '.join(choices)}; got {value!r}")
