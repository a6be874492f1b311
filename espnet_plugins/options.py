"""The ``peft`` block of an ESPnet training config: its command-line options and their meaning.

    peft: ssvd_o                        # lora | dora | pissa | ssvd | ssvd_o | ssvd_core | hdmole
    peft_conf: {target_modules: [linear_q, linear_v], k_ratio: 0.25}
    peft_pretrained: exp/base/valid.acc.ave.pth   # base weights, loaded before injection
    peft_pretrained_config: null        # default: config.yaml next to peft_pretrained
    peft_modules_to_save: [ctc.ctc_lo]  # trained in full and saved with the adapter
    peft_save: adapter                  # adapter: model files hold adapter tensors only; all

A ``fusion`` block (``fusion.py``) uses the same peft_pretrained / peft_modules_to_save / peft_save
options, with or without ``peft``. Without either block the task behaves exactly like ESPnet's.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from espnet2.utils.nested_dict_action import NestedDictAction
from espnet2.utils.types import str_or_none

from espnet_plugins.fusion import FUSION_KEY, FusionOptions, fusion_options
from ssvd_peft.config import AdapterConfig, PeftConfigError, config_from_dict
from ssvd_peft.layers.base import DEFAULT_ADAPTER
from ssvd_peft.registry import method_names

SAVE_MODES = ("adapter", "all")


@dataclass
class PeftOptions:
    """The peft block (``method`` None for feature fusion alone) and the fusion block, read from parsed
    ESPnet arguments."""

    method: str | None
    conf: dict[str, Any]
    pretrained: str | None = None
    pretrained_config: str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    save: str = "adapter"
    adapter_name: str = DEFAULT_ADAPTER
    init_param: list[str] = field(default_factory=list)
    fusion: FusionOptions | None = None

    def adapter_config(self) -> AdapterConfig | None:
        """The adapter method's config; None for feature fusion without adapters."""
        return None if self.method is None else config_from_dict(self.method, dict(self.conf))

    def trained_modules(self) -> list[str]:
        """Module patterns trained in full and saved with the adapter: ``modules_to_save``, and with a
        fusion block its head and ``train_modules``."""
        fused = [] if self.fusion is None else self.fusion.trained_modules()
        return [*self.modules_to_save, *(name for name in fused if name not in self.modules_to_save)]


def add_peft_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Parameter-efficient fine-tuning (ssvd-peft)")
    group.add_argument(
        "--peft",
        type=str_or_none,
        default=None,
        choices=[*method_names(), None],
        help="Adapter method; the base model is frozen and only the adapters train",
    )
    group.add_argument(
        "--peft_conf",
        action=NestedDictAction,
        default=dict(),
        help="Method options: target_modules, exclude_modules, rank, k_ratio, ... (see ssvd_peft.config)",
    )
    group.add_argument(
        "--peft_pretrained",
        type=str_or_none,
        default=None,
        help="Model file of the pretrained base model, loaded (strictly) before the adapters are injected",
    )
    group.add_argument(
        "--peft_pretrained_config",
        type=str_or_none,
        default=None,
        help="Training config of the pretrained model; the model-defining options (encoder, decoder, "
        "frontend, token_list, ...) that this config leaves at their defaults are taken from it; "
        "default: config.yaml next to --peft_pretrained if it exists",
    )
    group.add_argument(
        "--peft_modules_to_save",
        type=str,
        nargs="*",
        default=[],
        help="Modules trained in full and saved with the adapter, e.g. ctc.ctc_lo",
    )
    group.add_argument(
        "--peft_save",
        type=str,
        default="adapter",
        choices=SAVE_MODES,
        help="adapter: model files (Nepoch.pth, *.best.pth, checkpoint.pth) hold only the adapter "
        "and modules_to_save tensors; all: the full state dict",
    )
    group.add_argument(
        "--peft_adapter_name",
        type=str,
        default=DEFAULT_ADAPTER,
        help="Name of the injected adapter",
    )
    group.add_argument(
        "--peft_hdmole",
        action=NestedDictAction,
        default=dict(),
        help="Removed: HDMoLE's options (domain_weight, balance_weight, router_source, router_side, "
        "router_dim, domains) now go into --peft_conf; a config that still sets it is refused",
    )
    group.add_argument(
        "--peft_init_param",
        type=str,
        nargs="*",
        default=[],
        help="Set by the task: the --init_param entries it loaded before injecting the adapters "
        "(recorded so that inference rebuilds the same base model)",
    )


def peft_options(args: argparse.Namespace) -> PeftOptions | None:
    """The peft and fusion blocks of ``args``, or None when neither is set. ESPnet's own adapters
    (``use_adapter: true``) in the same config are refused."""
    method = getattr(args, "peft", None)
    fusion = fusion_options(args)
    if method is None and fusion is None:
        return None
    moved = dict(getattr(args, "peft_hdmole", None) or {})
    if moved:
        raise PeftConfigError(
            f"peft_hdmole is gone: its keys {sorted(moved)} go into peft_conf now, next to the other "
            f"HDMoLE options (peft_conf: {{..., {', '.join(f'{k}: {v!r}' for k, v in moved.items())}}}); "
            "remove the peft_hdmole block"
        )
    if getattr(args, "use_adapter", False) and method is None:
        raise PeftConfigError(
            "the fusion block and ESPnet's own --use_adapter true: a fusion model's files hold its head "
            "and train_modules, so ESPnet's adapters would be lost; remove use_adapter / adapter / "
            "adapter_conf and put adapters in with a peft block (peft: lora, ...) beside the fusion block"
        )
    if getattr(args, "use_adapter", False):
        raise PeftConfigError(
            f"--peft {method} and ESPnet's own --use_adapter true (--adapter "
            f"{getattr(args, 'adapter', None)}) both put adapters into the model: ESPnet's would wrap "
            "layers the peft block already wrapped, and adapter-only model files would drop its "
            "tensors. Use one of them: remove use_adapter / adapter / adapter_conf, or the peft block"
        )
    return PeftOptions(
        method=method,
        conf=dict(getattr(args, "peft_conf", None) or {}),
        pretrained=getattr(args, "peft_pretrained", None),
        pretrained_config=getattr(args, "peft_pretrained_config", None),
        modules_to_save=list(getattr(args, "peft_modules_to_save", None) or []),
        save=getattr(args, "peft_save", "adapter"),
        adapter_name=getattr(args, "peft_adapter_name", DEFAULT_ADAPTER),
        init_param=list(getattr(args, "peft_init_param", None) or []),
        fusion=fusion,
    )


def without_peft_options(config: dict[str, Any]) -> dict[str, Any]:
    """A training config with the peft and fusion blocks removed (what a plain ESPnet model needs)."""
    return {
        key: value
        for key, value in config.items()
        if key not in ("peft", FUSION_KEY) and not key.startswith("peft_")
    }
