"""What every adapter configuration has, and building one from a YAML block.

A configuration says WHERE adapters go (``target_modules``, ``exclude_modules``), HOW each
one is built (the method's options) and how options differ per module
(``module_overrides``: ``{pattern: {option: value}}``, applied in order to the modules a
pattern matches). Each method's config class lives in its home, ``ssvd_peft/methods/<name>.py``,
and knows the two things generic code asks of it: ``build(base_layer)``, the adapter of one
layer, and ``trainable_split(in, out)``, its closed-form parameter count.
``config_from_dict("ssvd_o", {...})`` builds one from a YAML block and rejects unknown methods,
unknown options and out-of-range values with one clear message.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.registry import get_method
from ssvd_peft.targets import matches

if TYPE_CHECKING:
    from ssvd_peft.layers.base import Adapter, TrainableSplit


def option(text: str, **kwargs: Any) -> Any:
    """A config field with its help text (shown by ``--help`` and in the docs)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class AdapterConfig:
    """Options shared by every method."""

    method: ClassVar[str] = ""

    target_modules: list[str] = option(
        "module names to adapt: dot-suffixes (linear_q) or regexes matching the full name",
        default_factory=list,
    )
    exclude_modules: list[str] = option(
        "module names never to adapt, in the same syntax (each must match some module of the model)",
        default_factory=list,
    )
    module_overrides: dict[str, dict[str, Any]] = option(
        "per-module option changes: {pattern: {option: value}}, applied in order",
        default_factory=dict,
    )
    init_weights: bool = option(
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
            reject_unknown(self.method, overrides, self.layer_options(), "module_overrides")
        self.validate()
        for pattern, overrides in self.module_overrides.items():
            try:
                dataclasses.replace(self, module_overrides={}, **overrides)
            except PeftConfigError as error:
                raise PeftConfigError(f"module_overrides[{pattern!r}]: {error}") from None

    def validate(self) -> None:
        """Check the method's options; subclasses raise PeftConfigError on bad values."""

    def build(self, base_layer: nn.Linear) -> Adapter:
        """The adapter of one layer (this config already holds the layer's overrides)."""
        raise NotImplementedError(f"{type(self).__name__} does not build an adapter")

    def trainable_split(self, in_features: int, out_features: int) -> TrainableSplit:
        """Closed-form trainable-parameter counts of ``build`` on an in -> out layer, by subspace;
        raises ValueError when the options do not fit the layer."""
        raise NotImplementedError(f"{type(self).__name__} does not count its parameters")

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


def config_from_dict(method: str, options: dict[str, Any] | None) -> AdapterConfig:
    """Build the config of ``method`` from a mapping (for example a YAML ``peft_conf`` block)."""
    config_class = get_method(method).config
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise PeftConfigError(f"{method}: options must be a mapping {{option: value}}, got {options!r}")
    reject_unknown(method, options, config_class.option_names(), "option")
    return config_class(**options)


def reject_unknown(method: str, options: dict[str, Any], known: list[str], what: str) -> None:
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PeftConfigError(f"{method}: unknown {what} {name!r}.{hint} Valid: {', '.join(known)}")


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_int(method: str, name: str, value: Any) -> None:
    if not is_positive_int(value):
        raise PeftConfigError(f"{method}: {name} must be a positive integer, got {value!r}")


def check_choice(method: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PeftConfigError(f"{method}: {name} must be one of {', '.join(choices)}; got {value!r}")
