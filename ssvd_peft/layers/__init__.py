"""One module per method's math; each adapter wraps a frozen nn.Linear through AdapterLinear.

Layers take explicit arguments and never import configs or injection: a method's config
(``ssvd_peft.methods``) turns options into those arguments.
"""

from ssvd_peft.layers.base import Adapter, AdapterLinear
from ssvd_peft.layers.dora import DoraAdapter
from ssvd_peft.layers.hdmole import HdmoleAdapter
from ssvd_peft.layers.lora import LoraAdapter
from ssvd_peft.layers.pissa import PissaAdapter
from ssvd_peft.layers.ssvd import SsvdAdapter
from ssvd_peft.layers.ssvd_espnet import EspnetSsvdAdapter

__all__ = [
    "Adapter",
    "AdapterLinear",
    "DoraAdapter",
    "EspnetSsvdAdapter",
    "HdmoleAdapter",
    "LoraAdapter",
    "PissaAdapter",
    "SsvdAdapter",
]
