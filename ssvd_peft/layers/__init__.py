"""One module per method; each adapter wraps a frozen nn.Linear through AdapterLinear."""

from ssvd_peft.layers.base import Adapter, AdapterLinear
from ssvd_peft.layers.dora import DoraAdapter
from ssvd_peft.layers.hdmole import HdmoleAdapter
from ssvd_peft.layers.lora import LoraAdapter
from ssvd_peft.layers.pissa import PissaAdapter
from ssvd_peft.layers.ssvd import SsvdAdapter

ADAPTER_CLASSES: dict[str, type[Adapter]] = {
    "lora": LoraAdapter,
    "dora": DoraAdapter,
    "pissa": PissaAdapter,
    "ssvd": SsvdAdapter,
    "ssvd_o": SsvdAdapter,
    "hdmole": HdmoleAdapter,
}

__all__ = [
    "ADAPTER_CLASSES",
    "Adapter",
    "AdapterLinear",
    "DoraAdapter",
    "HdmoleAdapter",
    "LoraAdapter",
    "PissaAdapter",
    "SsvdAdapter",
]
