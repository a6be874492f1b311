"""The methods of the round-trip matrix, on one small model, shared by the in-process tests, the
fresh-process loader and the DistributedDataParallel workers.

``RoundTripNet`` has tall, wide and square Linear layers (with and without bias) and a frozen
LayerNorm; HDMoLE's domain router is hooked to the input of ``up``. Every case starts from the
same base weights (seed 0) and, with ``init_weights: False``, from a non-trivial adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssvd_peft.inject import inject_adapters
from ssvd_peft.methods.hdmole_routing import attach_domain_router

IN, HIDDEN, OUT = 12, 20, 12
TARGETS = ["up", "mid", "down"]
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {"rank": 4, "dropout": 0.0}),
    "dora": ("dora", {"rank": 4}),
    "pissa": ("pissa", {"rank": 4}),
    "pissa-randomized": ("pissa", {"rank": 4, "svd_method": "randomized", "svd_niter": 1}),
    "ssvd": ("ssvd", {"k": 6}),
    "ssvd-espnet_compat": ("ssvd", {"k": 6, "espnet_compat": True}),
    "ssvd_o": ("ssvd_o", {"k": 6, "outer_share": 0.5}),
    "ssvd_o-no_outer": ("ssvd_o", {"k": 6, "outer_share": 0.0}),
    "ssvd_core": ("ssvd_core", {"k": 6}),
    "hdmole": ("hdmole", {"rank": 2, "num_domains": 2}),
}
MERGEABLE = [case for case, (method, _) in CASES.items() if method != "hdmole"]


class RoundTripNet(nn.Module):
    """12 -> 20 (tall) -> 20 (square, no bias) -> 12 (wide), tanh and a LayerNorm between."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(IN, HIDDEN)
        self.mid = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.norm = nn.LayerNorm(HIDDEN)
        self.down = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(torch.tanh(self.mid(torch.tanh(self.up(x))))))


def adapted_model(case: str, init_weights: bool = False, seed: int | None = None) -> nn.Module:
    """The base model with the adapter of ``case`` (HDMoLE with its domain router on ``up``'s input);
    ``seed``: the random state the injection starts from (default: what building the base left)."""
    method, options = CASES[case]
    model = RoundTripNet()
    if seed is not None:
        torch.manual_seed(seed)
    inject_adapters(model, method, target_modules=TARGETS, init_weights=init_weights, **options)
    if method == "hdmole":
        router = attach_domain_router(model, feature_dim=IN, source_module="up")
        if not init_weights:
            with torch.no_grad():
                router.proj.weight.normal_()
    return model


def inputs(seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 5, IN, generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, first: int = 0) -> None:
    """Training steps ``first`` .. ``first + steps - 1`` on a fixed regression target (step i always
    sees the same batch)."""
    model.train()
    for step in range(first, first + steps):
        x = inputs(2 + step)
        target = torch.sin(x[..., :OUT])
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    model.eval()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
