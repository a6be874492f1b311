"""A loud error when a targeted adapter receives no gradient in the first training step.

An adapter whose layer's forward never runs (the surrounding module reads ``layer.weight``
directly, as ``torch.nn.MultiheadAttention`` does with ``in_proj_weight``), or whose output never
reaches the loss (a decoder skipped at ``ctc_weight: 1.0``), trains nothing and says nothing:

    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    require_adapter_gradients(model, optimizer)   # checked once, at the first optimizer.step()

The check runs before the first ``optimizer.step()`` (so after the first backward, gradient
accumulation included) and then removes itself. A zero gradient passes (LoRA's A at B = 0 gets
one); only a gradient that was never computed (``None``) is an error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssvd_peft.layers.base import is_adapter_parameter


class AdapterGradientError(RuntimeError):
    """Trainable adapter parameters got no gradient: their adapters do not take part in training."""


def adapters_without_gradient(model: nn.Module) -> list[str]:
    """Names of the trainable adapter parameters whose ``.grad`` is None."""
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and parameter.grad is None and is_adapter_parameter(name)
    ]


def check_adapter_gradients(model: nn.Module) -> None:
    """Raise ``AdapterGradientError`` if a trainable adapter parameter has no gradient now."""
    missing = adapters_without_gradient(model)
    if not missing:
        return
    modules = sorted({name.split(".peft_adapters.")[0] for name in missing})
    raise AdapterGradientError(
        f"{len(missing)} trainable adapter parameters received no gradient in the first training step, "
        f"in {len(modules)} modules: {', '.join(modules[:5])}{' ...' if len(modules) > 5 else ''}. "
        "Their layers' forward never ran (a surrounding module reads .weight directly, as "
        "torch.nn.MultiheadAttention reads in_proj_weight) or their output does not reach the loss. "
        "Leave these modules out (exclude_modules) or target layers whose forward is called"
    )


def require_adapter_gradients(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Check ``model``'s adapter gradients once, just before ``optimizer``'s first step."""

    def check_once(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        handle.remove()
        check_adapter_gradients(model)

    handle = optimizer.register_step_pre_hook(check_once)
