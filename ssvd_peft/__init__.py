"""ssvd-peft: parameter-efficient fine-tuning of speech foundation models.

SSVD, SSVD-O, LoRA, DoRA and PiSSA as drop-in wrappers of nn.Linear, injected into any torch
model by target patterns, with exact merge/unmerge, adapter-only checkpoints and
parameter-budget reports. The core needs torch only; ESPnet integration lives in espnet_plugins.
"""

from ssvd_peft.budget import equal_budget_configs, estimate_budget, format_budget_table
from ssvd_peft.config import (
    DoraConfig,
    LoraConfig,
    PeftConfigError,
    PissaConfig,
    SsvdConfig,
    SsvdOConfig,
    config_from_dict,
)
from ssvd_peft.gradient_check import require_adapter_gradients
from ssvd_peft.inject import (
    inject_adapters,
    mark_only_adapters_trainable,
    merge_adapters,
    merge_and_unload,
    set_adapter,
    unload,
    unmerge_adapters,
)

__version__ = "0.1.0"

__all__ = [
    "DoraConfig",
    "LoraConfig",
    "PeftConfigError",
    "PissaConfig",
    "SsvdConfig",
    "SsvdOConfig",
    "config_from_dict",
    "equal_budget_configs",
    "estimate_budget",
    "format_budget_table",
    "inject_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "merge_and_unload",
    "require_adapter_gradients",
    "set_adapter",
    "unload",
    "unmerge_adapters",
]
