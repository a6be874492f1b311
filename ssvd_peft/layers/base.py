"""The shared wrapper: a frozen ``nn.Linear`` plus named adapters, one of them active.

``AdapterLinear`` computes ``y = adapter(x, base_layer)`` for the active adapter and
``y = x W^T + b`` when no adapter is active or the active one is merged. It composes the
base layer (``self.base_layer``) and never copies its weight; in ``state_dict`` the base
parameters keep their original names (``weight``, ``bias``), so a checkpoint of the base
model loads into the wrapped model and back.

Every adapter's trainable parameters live under ``peft_adapters.<adapter name>.``, the one
name segment that freeze and save filters look for.

The state dict always holds the ORIGINAL base weight W under ``weight``, also while an adapter
is merged (W' in the layer). So a state dict means "base + adapter" in every state, and loading
it never applies an adapter twice.
Loading into a merged layer is refused (unmerge first).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

ADAPTERS_ATTR = "peft_adapters"
DEFAULT_ADAPTER = "default"


@dataclass(frozen=True)
class TrainableSplit:
    """Trainable parameters of one adapter by the subspace they act on.

    inner: input side (LoRA's A, SSVD's inner rotation); outer: output side (LoRA's B, DoRA's
    magnitude, SSVD-O's outer rotation); values: singular-value shifts (and their gate).
    """

    inner: int = 0
    outer: int = 0
    values: int = 0

    @property
    def total(self) -> int:
        return self.inner + self.outer + self.values


def is_adapter_parameter(parameter_name: str, adapter_name: str | None = None) -> bool:
    """True for parameters under ``peft_adapters.<adapter_name>.`` (any adapter if None)."""
    marker = f"{ADAPTERS_ATTR}."
    if marker not in parameter_name:
        return False
    return adapter_name is None or f"{marker}{adapter_name}." in parameter_name


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype weight updates are computed in: float64 for float64 weights, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Adapter(nn.Module, ABC):
    """One method's adapter of one linear layer: its trainable parameters and its math.

    ``exact_merge``: its update is one weight matrix (``delta_weight``), so merging is exact.
    Creating an adapter never changes the base weight.
    """

    exact_merge: ClassVar[bool] = True

    @abstractmethod
    def forward(self, x: torch.Tensor, base_layer: nn.Linear) -> torch.Tensor:
        """The adapted layer's output for input ``x``."""

    @abstractmethod
    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """W' - W, the change the adapter makes to the (current) base weight."""

    def task_deltas(self, base_layer: nn.Linear) -> list[torch.Tensor]:
        """The adapter's updates to the ORIGINAL base weight W, one per domain it was trained for
        (what merging combines): [W' - W] for an adapter with one update, in float32+."""
        return [self.delta_weight(base_layer.weight)]

    def merge_into(self, base_layer: nn.Linear) -> None:
        """Write the adapted weight W' = W + delta W into ``base_layer.weight`` (summed in float32+)."""
        weight = base_layer.weight
        dtype = compute_dtype(weight.dtype)
        weight.data.copy_(weight.detach().to(dtype) + self.delta_weight(weight).detach().to(dtype))

    def unmerged_weight(self, merged_weight: torch.Tensor) -> torch.Tensor:
        """The base weight W that ``merge_into`` turned into ``merged_weight`` = W'."""
        dtype = compute_dtype(merged_weight.dtype)
        delta = self.delta_weight(merged_weight).detach().to(dtype)
        return (merged_weight.detach().to(dtype) - delta).to(merged_weight.dtype)

    def unmerge_from(self, base_layer: nn.Linear) -> None:
        """Restore the weight that ``merge_into`` changed."""
        base_layer.weight.data.copy_(self.unmerged_weight(base_layer.weight))


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A small float64 signature of a weight: (rows, cols, Frobenius norm, two fixed projections).

    Two loads of the same checkpoint give the same signature to float precision; another
    base model gives a different one. Kept as a plain attribute, so ``model.to(dtype)``
    leaves it in float64.
    """
    w = weight.detach().to(torch.float64).cpu()
    generator = torch.Generator().manual_seed(20250902)
    probe_rows = torch.randn(w.shape[0], generator=generator, dtype=torch.float64)
    probe_cols = torch.randn(w.shape[1], generator=generator, dtype=torch.float64)
    return torch.stack(
        [
            torch.tensor(float(w.shape[0]), dtype=torch.float64),
            torch.tensor(float(w.shape[1]), dtype=torch.float64),
            torch.linalg.norm(w),
            probe_rows @ w @ probe_cols,
            w.sum(),
        ]
    )


class AdapterLinear(nn.Module):
    """A frozen linear layer with named adapters: y = adapter(x; W, b) or x W^T + b."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"AdapterLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.peft_adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.base_fingerprint = weight_fingerprint(base_layer.weight)
        self._register_state_dict_hook(_original_base_on_save)
        self._register_load_state_dict_pre_hook(_original_base_on_load, with_module=True)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, adapter: Adapter, *, activate: bool = True) -> None:
        if name in self.peft_adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; pick another name")
        self.peft_adapters[name] = adapter
        if activate:
            self.set_adapter(name)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: plain base layer)."""
        if name is not None and name not in self.peft_adapters:
            raise KeyError(f"no adapter {name!r}; this layer has {list(self.peft_adapters)}")
        if self.merged_adapter is not None and self.merged_adapter != name:
            self.unmerge()
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            self.unmerge()
        del self.peft_adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_adapter is None or self.merged_adapter is not None:
            return self.base_layer(x)
        return self.peft_adapters[self.active_adapter](x, self.base_layer)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """W' - W of adapter ``name`` (default: the active one) against the unmerged base weight."""
        if self.merged_adapter is not None:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged, so the base weight already holds W'; "
                "call unmerge() before asking for delta_weight()"
            )
        adapter = self._adapter(name)
        return adapter.delta_weight(self.base_layer.weight)

    def merge(self) -> None:
        """Fold the active adapter into the base weight; forward then costs a plain Linear."""
        if self.merged_adapter is not None:
            return
        self._adapter(None).merge_into(self.base_layer)
        self.merged_adapter = self.active_adapter

    def unmerge(self) -> None:
        """Restore the base weight that ``merge`` changed."""
        if self.merged_adapter is None:
            return
        self.peft_adapters[self.merged_adapter].unmerge_from(self.base_layer)
        self.merged_adapter = None

    def original_weight(self) -> torch.Tensor | None:
        """The base weight W without the merged adapter, when ``base_layer.weight`` holds a merged
        W'; None when it holds W."""
        if self.merged_adapter is not None:
            return self.peft_adapters[self.merged_adapter].unmerged_weight(self.base_layer.weight)
        return None

    def _adapter(self, name: str | None) -> Adapter:
        name = self.active_adapter if name is None else name
        if name is None:
            raise RuntimeError("no active adapter on this layer; call set_adapter(name) first")
        return self.peft_adapters[name]

    def extra_repr(self) -> str:
        return f"active_adapter={self.active_adapter!r}, merged={self.merged_adapter is not None}"


def _original_base_on_save(
    module: AdapterLinear, state_dict: dict[str, Any], prefix: str, _meta: Any
) -> None:
    """Store the base parameters under their original names and values (W, not a merged W')."""
    for name in ("weight", "bias"):
        key = f"{prefix}base_layer.{name}"
        if key in state_dict:
            state_dict[f"{prefix}{name}"] = state_dict.pop(key)
    original = module.original_weight()
    if original is not None and f"{prefix}weight" in state_dict:
        state_dict[f"{prefix}weight"] = original.detach()


def _original_base_on_load(
    module: AdapterLinear, state_dict: dict[str, Any], prefix: str, *_args: Any
) -> None:
    """Read original base parameters into the wrapped layer (refused while an adapter is merged)."""
    if module.merged_adapter is not None and any(key.startswith(prefix) for key in state_dict):
        raise RuntimeError(
            f"cannot load a state dict into {prefix.rstrip('.') or 'the layer'} while adapter "
            f"{module.merged_adapter!r} is merged into its weight; call unmerge_adapters(model) first"
        )
    for name in ("weight", "bias"):
        key = f"{prefix}{name}"
        if key in state_dict:
            state_dict[f"{prefix}base_layer.{name}"] = state_dict.pop(key)
