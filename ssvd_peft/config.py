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
        for pattern, overrides in self.module_overrides.items():
            if not isinstance(overrides, dict):
                raise PeftConfigError(
                    f"{self.method}: module_overrides[{pattern!r}] must be a mapping "
                    "{option: value}, got " + repr(overrides)
                )
            _reject_unknown(self.method, overrides, self.layer_options(), "module_overrides")
        self.validate()
        for overrides in self.module_overrides.values():
            dataclasses.replace(self, module_overrides={}, **overrides)

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
    neumann_terms: int = _help("terms of the truncated Neumann series (rotation: neumann)", default=4)
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


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    cls.method: cls for cls in (LoraConfig, DoraConfig, PissaConfig, SsvdConfig, SsvdOConfig)
}


def config_from_dict(method: str, options: dict[str, Any]) -> AdapterConfig:
    """Build the config of ``method`` from a mapping (for example a YAML ``peft_conf`` block)."""
    config_class = config_class_for(method)
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


def _check_positive_int(method: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PeftConfigError(f"{method}: {name} must be a positive integer, got {value!r}")


def _check_choice(method: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PeftConfigError(f"{method}: {name} must be one of {', '.join(choices)}; got {value!r}")
