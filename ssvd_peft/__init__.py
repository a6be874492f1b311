"""ssvd-peft: parameter-efficient fine-tuning of speech foundation models.

SSVD, SSVD-O, LoRA, DoRA, PiSSA and HDMoLE as drop-in wrappers of nn.Linear, injected into any torch
model by target patterns, with exact merge/unmerge, adapter-only checkpoints and
parameter-budget reports. The core needs torch only; ESPnet integration lives in espnet_plugins.
"""

from ssvd_peft.budget import equal_budget_configs, estimate_budget, format_budget_table
from ssvd_peft.config import PeftConfigError, config_from_dict
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
from ssvd_peft.methods.dora import DoraConfig
from ssvd_peft.methods.hdmole import HdmoleConfig
from ssvd_peft.methods.lora import LoraConfig
from ssvd_peft.methods.pissa import PissaConfig
from ssvd_peft.methods.ssvd import SsvdConfig, SsvdCoreConfig, SsvdOConfig
from ssvd_peft.registry import Method, get_method, method_names, register_method

__version__ = "0.1.0"

__all__ = [
    "DoraConfig",
    "HdmoleConfig",
    "LoraConfig",
    "Method",
    "PeftConfigError",
    "PissaConfig",
    "SsvdConfig",
    "SsvdCoreConfig",
    "SsvdOConfig",
    "config_from_dict",
    "equal_budget_configs",
    "estimate_budget",
    "format_budget_table",
    "get_method",
    "inject_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "merge_and_unload",
    "method_names",
    "register_method",
    "require_adapter_gradients",
    "set_adapter",
    "unload",
    "unmerge_adapters",
]
