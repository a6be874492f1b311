"""Adapters of every method on one small model, for the merging tests: a non-trivial adapter per
method and seed, saved to a file, and the base with it folded in by the library's own merge."""

from __future__ import annotations

import torch
from torch import nn

from ssvd_peft.checkpoint import load_adapter, save_adapter
from ssvd_peft.inject import inject_adapters, iter_adapter_layers, merge_and_unload

TARGETS = ["proj_in", "proj_out", "head"]
METHODS = {
    "lora": ("lora", {"rank": 2}),
    "dora": ("dora", {"rank": 2}),
    "pissa": ("pissa", {"rank": 2}),
    "ssvd": ("ssvd", {"k_ratio": 0.5}),
    "ssvd_o": ("ssvd_o", {"k_ratio": 0.5, "outer_share": 0.3}),
    "ssvd_compat": ("ssvd", {"k_ratio": 0.5, "espnet_compat": True}),
    "hdmole": ("hdmole", {"rank": 2, "num_domains": 2, "experts_per_domain": 1, "shared_experts": 1}),
}
SSVD_FAMILY = ["ssvd", "ssvd_o", "ssvd_compat"]


class TinyNet(nn.Module):
    """Tall, wide and square Linear layers and an output layer saved whole (``ctc``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj_in = nn.Linear(12, 24)
        self.proj_out = nn.Linear(24, 12, bias=False)
        self.head = nn.Linear(12, 12)
        self.ctc = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctc(self.head(self.proj_out(torch.tanh(self.proj_in(x)))))


def train_adapter(case: str, seed: int, path, targets=TARGETS, save_ctc: bool = False, **extra):
    """A non-trivial adapter of ``case`` on TinyNet, saved to ``path`` (the ctc layer moved and saved
    whole with ``save_ctc``)."""
    model = TinyNet()
    method, options = METHODS[case]
    torch.manual_seed(seed)
    inject_adapters(model, method, target_modules=targets, init_weights=False, **{**options, **extra})
    if method == "pissa":
        with torch.no_grad():
            for _, layer in iter_adapter_layers(model):
                layer.peft_adapters["default"].lora_B.add_(
                    0.3 * torch.randn_like(layer.peft_adapters["default"].lora_B)
                )
    if save_ctc:
        with torch.no_grad():
            model.ctc.weight.add_(0.1 * torch.randn_like(model.ctc.weight))
    save_adapter(model, path, modules_to_save=["ctc"] if save_ctc else None)
    return path


def applied(path) -> dict[str, torch.Tensor]:
    """The base with the adapter at ``path`` folded in (the library's own merge)."""
    model = TinyNet()
    load_adapter(model, path)
    return merge_and_unload(model).state_dict()
