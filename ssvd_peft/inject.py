"""Putting adapters into any torch model, switching between them, and taking them out.

    report = inject_adapters(model, "ssvd_o", target_modules=["linear_q", "linear_v"], k_ratio=0.25)
    print(report)                      # per-module trainable parameters
    ...train...
    model = merge_and_unload(model)    # a plain model with W' in its Linear layers

Injection checks everything before it changes the model: every target pattern must match a
module, every matched module must be an ``nn.Linear`` whose forward is really called, and every
layer's rank or k must fit the layer. A failed call leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from ssvd_peft.budget import InjectionReport, estimate_budget
from ssvd_peft.config import AdapterConfig, PeftConfigError, config_from_dict
from ssvd_peft.layers.base import DEFAULT_ADAPTER, AdapterLinear, is_adapter_parameter
from ssvd_peft.model_parts import detach_model_parts
from ssvd_peft.registry import get_method
from ssvd_peft.targets import closest_names, matches


def inject_adapters(
    model: nn.Module,
    config: AdapterConfig | str,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    freeze_base: bool = True,
    **options: Any,
) -> InjectionReport:
    """Wrap every targeted ``nn.Linear`` of ``model`` in place and add adapter ``adapter_name``.

    ``config`` is a config object or a method name whose options come as keyword arguments.
    The wrapped base layers are always frozen; with ``freeze_base`` every other parameter of the
    model is frozen too, so that only the new adapter trains. Everything is checked first (the
    targets, every layer's options, room for another adapter on an adapted layer); a failure on
    the way undoes what was done.
    """
    if isinstance(config, str):
        config = config_from_dict(config, options)
    elif options:
        raise TypeError("pass options either inside the config object or with a method name, not both")
    plan = estimate_budget(model, config, adapter_name)
    for planned in plan.modules:
        _check_can_add(planned.name, model.get_submodule(planned.name), adapter_name)
    touched: list[_Touched] = []
    try:
        for planned in plan.modules:
            layer = model.get_submodule(planned.name)
            touched.append(_Touched.record(planned.name, layer))
            wrapper = layer if isinstance(layer, AdapterLinear) else _wrap(model, planned.name, layer)
            wrapper.add_adapter(adapter_name, config.for_module(planned.name).build(wrapper.base_layer))
        part_class = get_method(config.method).model_part
        if part_class is not None:
            part_class.on_injected(model, adapter_name, config)
    except BaseException:
        detach_model_parts(model, adapter_name)
        for record in reversed(touched):
            record.restore(model, adapter_name)
        raise
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        configs = {}
        model.peft_config = configs
    configs[adapter_name] = config
    if freeze_base:
        mark_only_adapters_trainable(model, adapter_name=adapter_name)
    return plan


def iter_adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(name, wrapper) for every adapted layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in iter_adapter_layers(model):
        names.update(dict.fromkeys(layer.peft_adapters))
    return list(names)


def set_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Activate ``adapter_name`` on every layer that has it (others run their base weight);
    only the active adapter's parameters are trainable. None switches all adapters off."""
    known = adapter_names(model)
    if adapter_name is not None and adapter_name not in known:
        raise KeyError(f"no adapter {adapter_name!r} in this model; it has {known}")
    for _, layer in iter_adapter_layers(model):
        layer.set_adapter(adapter_name if adapter_name in layer.peft_adapters else None)
        for name, adapter in layer.peft_adapters.items():
            adapter.requires_grad_(name == adapter_name)


def merge_adapters(model: nn.Module) -> None:
    """Fold every active adapter into its base weight (reversible with ``unmerge_adapters``)."""
    for _, layer in iter_adapter_layers(model):
        if layer.active_adapter is not None:
            layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in iter_adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the weights and put plain ``nn.Linear`` layers back."""
    for name, layer in list(iter_adapter_layers(model)):
        if layer.active_adapter is not None:
            layer.merge()
        _replace(model, name, layer.base_layer)
    getattr(model, "peft_config", {}).clear()
    detach_model_parts(model)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` everywhere; layers left without adapters become plain again."""
    for name, layer in list(iter_adapter_layers(model)):
        if adapter_name in layer.peft_adapters:
            layer.delete_adapter(adapter_name)
        if not layer.peft_adapters:
            _replace(model, name, layer.base_layer)
    getattr(model, "peft_config", {}).pop(adapter_name, None)
    detach_model_parts(model, adapter_name)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and give back the original ``nn.Linear`` layers and weights."""
    for name, layer in list(iter_adapter_layers(model)):
        layer.unmerge()
        _replace(model, name, layer.base_layer)
    getattr(model, "peft_config", {}).clear()
    detach_model_parts(model)
    return model


def mark_only_adapters_trainable(
    model: nn.Module,
    modules_to_save: list[str] | None = None,
    adapter_name: str | None = None,
) -> None:
    """Freeze everything except adapter parameters (of ``adapter_name``, default: all adapters)
    and the modules matching ``modules_to_save`` (e.g. ``["ctc.ctc_lo"]``)."""
    modules_to_save = modules_to_save or []
    if modules_to_save:
        names = [name for name, _ in model.named_modules()]
        for pattern in modules_to_save:
            if not any(matches(pattern, name) for name in names):
                close = closest_names(pattern, names)
                raise PeftConfigError(
                    f"modules_to_save pattern {pattern!r} matches no module. Closest: {', '.join(close)}"
                )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(
            is_adapter_parameter(name, adapter_name) or _in_saved_module(name, modules_to_save)
        )


def _in_saved_module(parameter_name: str, modules_to_save: list[str]) -> bool:
    module_name = parameter_name.rsplit(".", 1)[0]
    parts = module_name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(matches(pattern, prefix) for pattern in modules_to_save for prefix in prefixes)


def _check_can_add(name: str, layer: nn.Module, adapter_name: str) -> None:
    if not isinstance(layer, AdapterLinear) or not layer.peft_adapters:
        return
    if adapter_name in layer.peft_adapters:
        raise PeftConfigError(
            f"module {name!r} already has an adapter named {adapter_name!r}; "
            "choose another adapter_name or unload the old one"
        )
    if layer.merged_adapter is not None:
        raise PeftConfigError(
            f"module {name!r} has adapter {layer.merged_adapter!r} merged into its weight, so a new "
            "adapter would be built from the merged weight; call unmerge_adapters(model) first"
        )


@dataclass(frozen=True)
class _Touched:
    """A targeted module as it was before ``inject_adapters`` changed it, to undo a failed call."""

    name: str
    module: nn.Module
    active_adapter: str | None
    requires_grad: tuple[bool, ...]

    @classmethod
    def record(cls, name: str, module: nn.Module) -> _Touched:
        active = module.active_adapter if isinstance(module, AdapterLinear) else None
        return cls(name, module, active, tuple(p.requires_grad for p in module.parameters()))

    def restore(self, model: nn.Module, adapter_name: str) -> None:
        """Remove ``adapter_name`` and any new wrapper."""
        current = model.get_submodule(self.name)
        if isinstance(current, AdapterLinear) and adapter_name in current.peft_adapters:
            current.delete_adapter(adapter_name)
        if current is self.module:
            current.set_adapter(self.active_adapter)
        else:
            _replace(model, self.name, self.module)
        for parameter, requires_grad in zip(self.module.parameters(), self.requires_grad, strict=True):
            parameter.requires_grad_(requires_grad)


def _wrap(model: nn.Module, name: str, layer: nn.Linear) -> AdapterLinear:
    wrapper = AdapterLinear(layer)
    _replace(model, name, wrapper)
    return wrapper


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
