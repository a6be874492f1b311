"""Trainable-parameter budgets: per module, per subspace, in total, and equal across methods.

Closed forms per adapted in -> out layer (each method's config's ``trainable_split``):

    LoRA, PiSSA   r (in + out)
    DoRA          r (in + out) + out
    SSVD          k + k_in (k_in - 1) / 2                     (+1 gate with espnet_compat)
    SSVD-O        k + k_in (k_in - 1) / 2 + k_out (k_out - 1) / 2
    HDMoLE        N r (in + out) + N (in + 1) + (1 | in + 1)     (experts, local router, threshold)

``format_budget_table`` groups a plan by model part (encoder / decoder / other), by block
(attention / feed-forward / other) and by subspace (inner = input side, outer = output side,
values = singular-value shifts). ``equal_budget_configs`` picks every method's rank or k so that
all methods train (nearly) the same number of parameters, the comparison the papers make; a
method that cannot come within one knob step of the budget (its largest rank or k trains too
little, or its smallest too much) is reported with its shortfall and a ``BudgetShortfallWarning``,
or refused with ``strict=True``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from torch import nn

from ssvd_peft.config import AdapterConfig, PeftConfigError, config_from_dict
from ssvd_peft.layers.base import (
    ADAPTERS_ATTR,
    DEFAULT_ADAPTER,
    AdapterLinear,
    TrainableSplit,
    is_adapter_parameter,
)
from ssvd_peft.registry import get_method
from ssvd_peft.targets import find_target_layers

ATTENTION_MARKERS = ("attn", "attention", "linear_q", "linear_k", "linear_v", "linear_out")
FEED_FORWARD_MARKERS = ("feed_forward", "w_1", "w_2", "ffn", "mlp", "channel_proj", "merge_proj", "fc")


@dataclass(frozen=True)
class InjectedModule:
    """One adapted layer: where it is, its shape and its trainable-parameter count."""

    name: str
    method: str
    in_features: int
    out_features: int
    split: TrainableSplit

    @property
    def trainable(self) -> int:
        return self.split.total


@dataclass
class InjectionReport:
    """What an injection does (or did): the adapted modules and the parameter totals."""

    adapter_name: str
    method: str
    modules: list[InjectedModule]
    model_parameters: int

    @property
    def trainable(self) -> int:
        return sum(module.trainable for module in self.modules)

    def __str__(self) -> str:
        return format_budget_table(self)

    def to_dict(self) -> dict[str, Any]:
        """The report as data (JSON-able): every module with its shape and split, the groups, totals."""
        return {
            "adapter_name": self.adapter_name,
            "method": self.method,
            "model_parameters": self.model_parameters,
            "trainable": self.trainable,
            "modules": [
                {
                    "name": m.name,
                    "in_features": m.in_features,
                    "out_features": m.out_features,
                    **dataclasses.asdict(m.split),
                    "total": m.trainable,
                }
                for m in self.modules
            ],
            "groups": [
                {"part": part, "block": block, **counts}
                for (part, block), counts in budget_groups(self).items()
            ],
        }


def model_part(module_name: str) -> str:
    """encoder, decoder or other, from the first name segment that says so."""
    for segment in module_name.split("."):
        if "encoder" in segment:
            return "encoder"
        if "decoder" in segment:
            return "decoder"
    return "other"


def block_kind(module_name: str) -> str:
    """attention, feed_forward or other, from the module's name."""
    segments = module_name.split(".")
    if any(marker in segment for segment in segments for marker in ATTENTION_MARKERS):
        return "attention"
    if any(marker in segment for segment in segments for marker in FEED_FORWARD_MARKERS):
        return "feed_forward"
    return "other"


def estimate_budget(
    model: nn.Module, config: AdapterConfig | str, adapter_name: str = DEFAULT_ADAPTER, **options: Any
) -> InjectionReport:
    """What ``inject_adapters`` would add (modules and parameter counts), without changing the
    model; every target and every layer's options are checked."""
    if isinstance(config, str):
        config = config_from_dict(config, options)
    base_parameters = sum(p.numel() for n, p in model.named_parameters() if not is_adapter_parameter(n))
    report = InjectionReport(adapter_name, config.method, [], base_parameters)
    for name, layer in find_target_layers(model, config).items():
        base = layer.base_layer if isinstance(layer, AdapterLinear) else layer
        try:
            split = config.for_module(name).trainable_split(base.in_features, base.out_features)
        except ValueError as error:
            raise PeftConfigError(f"module {name!r}: {error}") from None
        report.modules.append(InjectedModule(name, config.method, base.in_features, base.out_features, split))
    return report


def adapter_report(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> InjectionReport:
    """The report of adapter ``adapter_name`` as injected in ``model`` (from its layers and config)."""
    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise PeftConfigError(f"the model has no adapter named {adapter_name!r} (it has {sorted(configs)})")
    config = configs[adapter_name]
    base_parameters = sum(p.numel() for n, p in model.named_parameters() if not is_adapter_parameter(n))
    report = InjectionReport(adapter_name, config.method, [], base_parameters)
    for name, layer in model.named_modules():
        if isinstance(layer, AdapterLinear) and adapter_name in layer.peft_adapters:
            split = config.for_module(name).trainable_split(layer.in_features, layer.out_features)
            report.modules.append(
                InjectedModule(name, config.method, layer.in_features, layer.out_features, split)
            )
    return report


@dataclass
class TrainingBudget:
    """What trains: the adapter's report, its model part's parameters, the modules_to_save and
    their parameters, and the trainable (everything that requires grad) and total parameters."""

    report: InjectionReport
    model_part: int
    modules_to_save: list[str]
    saved_parameters: int
    trainable: int
    model_parameters: int

    def to_dict(self) -> dict[str, Any]:
        """As data (JSON-able): what ``peft_budget.json`` holds."""
        return {
            "adapter": self.report.to_dict(),
            "model_part": self.model_part,
            "modules_to_save": {"patterns": self.modules_to_save, "parameters": self.saved_parameters},
            "trainable": self.trainable,
            "model_parameters": self.model_parameters,
        }

    def __str__(self) -> str:
        lines = [format_budget_table(self.report)]
        if self.model_part:
            lines.append(
                f"model part {ADAPTERS_ATTR}.{self.report.adapter_name}: {self.model_part:,} parameters"
            )
        if self.saved_parameters:
            lines.append(f"modules_to_save {self.modules_to_save}: {self.saved_parameters:,} parameters")
        share = 100.0 * self.trainable / max(self.model_parameters, 1)
        lines.append(
            f"trainable in all: {self.trainable:,} of {self.model_parameters:,} parameters ({share:.3f}%)"
        )
        return "\n".join(lines)


def training_budget(
    model: nn.Module, adapter_name: str = DEFAULT_ADAPTER, modules_to_save: list[str] | None = None
) -> TrainingBudget:
    """The ``TrainingBudget`` of adapter ``adapter_name`` in ``model`` as it stands (frozen or not)."""
    named = dict(model.named_parameters())
    part = [p for n, p in named.items() if n.startswith(f"{ADAPTERS_ATTR}.{adapter_name}.")]
    saved = [p for n, p in named.items() if p.requires_grad and not is_adapter_parameter(n)]
    return TrainingBudget(
        report=adapter_report(model, adapter_name),
        model_part=sum(p.numel() for p in part),
        modules_to_save=list(modules_to_save or []),
        saved_parameters=sum(p.numel() for p in saved),
        trainable=sum(p.numel() for p in named.values() if p.requires_grad),
        model_parameters=sum(p.numel() for p in named.values()),
    )


def budget_groups(report: InjectionReport) -> dict[tuple[str, str], dict[str, int]]:
    """{(part, block): {"modules", "inner", "outer", "values", "total"}} over the plan."""
    groups: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for module in report.modules:
        group = groups[(model_part(module.name), block_kind(module.name))]
        group["modules"] += 1
        group["inner"] += module.split.inner
        group["outer"] += module.split.outer
        group["values"] += module.split.values
        group["total"] += module.split.total
    return {key: dict(value) for key, value in sorted(groups.items())}


def format_budget_table(report: InjectionReport, per_module: bool = True) -> str:
    """A plain-text table: one row per module (optional), per group, and the total."""
    header = f"{'module':<56} {'in x out':>11} {'inner':>9} {'outer':>9} {'values':>8} {'total':>10}"
    lines = [f"adapter {report.adapter_name!r} ({report.method})", header, "-" * len(header)]
    if per_module:
        for m in report.modules:
            shape = f"{m.in_features}x{m.out_features}"
            lines.append(
                f"{_clip(m.name, 56):<56} {shape:>11} {m.split.inner:>9} {m.split.outer:>9} "
                f"{m.split.values:>8} {m.trainable:>10}"
            )
        lines.append("-" * len(header))
    for (part, block), g in budget_groups(report).items():
        label = f"[{part} / {block}] {g['modules']} modules"
        lines.append(
            f"{label:<56} {'':>11} {g['inner']:>9} {g['outer']:>9} {g['values']:>8} {g['total']:>10}"
        )
    share = 100.0 * report.trainable / max(report.model_parameters, 1)
    lines.append("-" * len(header))
    lines.append(
        f"{'total: ' + str(len(report.modules)) + ' modules':<56} {'':>11} "
        f"{sum(m.split.inner for m in report.modules):>9} {sum(m.split.outer for m in report.modules):>9} "
        f"{sum(m.split.values for m in report.modules):>8} {report.trainable:>10}"
    )
    lines.append(
        f"trainable {report.trainable:,} of {report.model_parameters:,} model parameters ({share:.3f}%)"
    )
    return "\n".join(lines)


class BudgetShortfallWarning(UserWarning):
    """A method cannot train the requested number of parameters within one step of its knob."""


@dataclass(frozen=True)
class BudgetMatch:
    """One method's config for a budget: its knob value, what it trains, and how far that is.

    ``step`` is the change in the trainable count from ``value`` to the next value of the knob
    (to the previous one at the largest value); ``reached`` is True when the count is within one
    step of the budget, False when the budget lies beyond every value the knob can take.
    """

    method: str
    config: AdapterConfig
    knob: str
    value: int
    trainable: int
    budget: int
    step: int

    @property
    def shortfall(self) -> int:
        """budget - trainable: positive when the method trains fewer parameters than asked."""
        return self.budget - self.trainable

    @property
    def reached(self) -> bool:
        return abs(self.shortfall) <= self.step

    def describe(self) -> str:
        side = "below" if self.shortfall > 0 else "above"
        return (
            f"{self.method}: the budget of {self.budget:,} trainable parameters is out of reach; the "
            f"closest, {self.knob} = {self.value}, trains {self.trainable:,} ({abs(self.shortfall):,} "
            f"{side} it, one {self.knob} step = {self.step:,}); change the targets or the budget"
        )


def equal_budget_configs(
    model: nn.Module,
    budget: int,
    methods: dict[str, dict[str, Any]],
    strict: bool = False,
) -> dict[str, BudgetMatch]:
    """For each method, the config whose total trainable count is closest to ``budget``.

    ``methods`` maps a method name to its other options (target_modules and so on); the method's
    knob (its registry entry's: rank for LoRA/DoRA/PiSSA/HDMoLE, k for SSVD/SSVD-O) is searched
    over 1 .. the largest value every targeted layer allows. A match is within one knob step of ``budget``
    unless the budget is out of the knob's reach: then a ``BudgetShortfallWarning`` names the
    shortfall (``strict``: a ``PeftConfigError``), and the match says so (``reached``).
    """
    matches = {method: _closest_config(model, budget, method, options) for method, options in methods.items()}
    for match in matches.values():
        if match.reached:
            continue
        if strict:
            raise PeftConfigError(match.describe())
        warnings.warn(match.describe(), BudgetShortfallWarning, stacklevel=2)
    return matches


def _closest_config(model: nn.Module, budget: int, method: str, options: dict[str, Any]) -> BudgetMatch:
    knob = get_method(method).knob
    template = config_from_dict(method, options)
    layers = [
        (name, layer.in_features, layer.out_features)
        for name, layer in find_target_layers(model, template).items()
    ]
    limit = min(min(in_features, out_features) for _, in_features, out_features in layers)
    totals: list[tuple[int, int, AdapterConfig]] = []  # (value, total, config), value ascending
    for value in range(1, limit + 1):
        config = dataclasses.replace(template, **{knob: value})
        try:
            total = sum(
                config.for_module(name).trainable_split(in_features, out_features).total
                for name, in_features, out_features in layers
            )
        except ValueError:
            continue
        totals.append((value, total, config))
        if total > budget and len(totals) > 1:
            break
    if not totals:
        raise PeftConfigError(f"{method}: no {knob} fits the targeted layers")
    index = min(range(len(totals)), key=lambda i: abs(totals[i][1] - budget))
    value, total, config = totals[index]
    neighbour = index + 1 if index + 1 < len(totals) else index - 1
    step = abs(totals[neighbour][1] - total) if neighbour >= 0 else total
    return BudgetMatch(method, config, knob, value, total, budget, step)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]
