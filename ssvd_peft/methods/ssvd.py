"""SSVD's and SSVD-O's home: their configs, how a config sizes one layer's adapter, and their
registry entries (the math: ``ssvd_peft.layers.ssvd``; ESPnet's variant: ``layers.ssvd_espnet``);
also ``ssvd_core``, the free k x k core a merge of SSVD-family adapters keeps
(``layers.ssvd_core``).

Sizes per in -> out layer, m = min(in, out):
    k      = k, or round(k_ratio m) (at least 1; floor(k_ratio m) with espnet_compat, as ESPnet)
    SSVD   k_in = k_in or k, k_out = 0
    SSVD-O a rotation budget P (default k (k - 1) / 2) split by outer_share rho:
           k_in = the largest j with j (j - 1) / 2 <= (1 - rho) P, k_out the same for rho P
           (explicit k_in / k_out win); rho = 0 is SSVD.
Trainable parameters per layer: k + k_in (k_in - 1) / 2 + k_out (k_out - 1) / 2 (+1 gate with
espnet_compat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ssvd_peft.config import AdapterConfig, PeftConfigError, check_choice, check_positive_int, option
from ssvd_peft.layers.base import TrainableSplit
from ssvd_peft.layers.rotation import num_skew_params
from ssvd_peft.layers.ssvd import SsvdAdapter
from ssvd_peft.layers.ssvd_core import SsvdCoreAdapter
from ssvd_peft.layers.ssvd_espnet import EspnetSsvdAdapter
from ssvd_peft.registry import Method, register_method

ROTATIONS = ("cayley", "neumann", "expm")


@dataclass(frozen=True)
class SsvdDims:
    """Sizes of one layer's SSVD adapter: subspace k, inner rotation k_in, outer rotation k_out."""

    k: int
    k_in: int
    k_out: int


@dataclass
class SsvdConfig(AdapterConfig):
    """SSVD: shift the top-k singular values and rotate the first k_in right singular vectors."""

    method: ClassVar[str] = "ssvd"

    k: int | None = option("size of the adapted singular subspace (default: k_ratio * m)", default=None)
    k_ratio: float = option("k as a fraction of m = min(in, out) when k is not given", default=0.4)
    k_in: int | None = option("size of the inner (input-side) rotation (default: k)", default=None)
    rotation: str = option("skew -> orthogonal map: cayley (exact), neumann, expm", default="cayley")
    neumann_terms: int = option(
        "highest power n of the truncated Neumann series (rotation: neumann)", default=4
    )
    espnet_compat: bool = option(
        "reproduce ESPnet master's SSVDLinear: k = floor(k_ratio m), rotation I + 2S of the smaller "
        "side, sigmoid gate on the shift, ESPnet's initialisation",
        default=False,
    )

    def validate(self) -> None:
        if self.k is not None:
            check_positive_int(self.method, "k", self.k)
        if not 0.0 < self.k_ratio <= 1.0:
            raise PeftConfigError(f"{self.method}: k_ratio must be in (0, 1], got {self.k_ratio}")
        if self.k_in is not None:
            check_positive_int(self.method, "k_in", self.k_in)
        check_choice(self.method, "rotation", self.rotation, ROTATIONS)
        check_positive_int(self.method, "neumann_terms", self.neumann_terms)
        if self.espnet_compat and self.k_in is not None:
            raise PeftConfigError(
                f"{self.method}: espnet_compat rotates all k singular vectors of the smaller side, as "
                "ESPnet's SSVDLinear does; leave k_in out"
            )

    def dims(self, in_features: int, out_features: int) -> SsvdDims:
        """k, k_in and k_out of one in -> out layer (see the module docstring)."""
        k = self.subspace_size(in_features, out_features)
        if self.espnet_compat:
            return SsvdDims(k, k, 0) if out_features >= in_features else SsvdDims(k, 0, k)
        k_in, k_out = self.rotation_sizes(k)
        for name, size in (("k_in", k_in), ("k_out", k_out)):
            if size > k:
                raise ValueError(
                    f"{self.method}: {name} = {size} exceeds the subspace size k = {k}; lower it or raise k"
                )
        return SsvdDims(k, k_in, k_out)

    def subspace_size(self, in_features: int, out_features: int) -> int:
        return subspace_size(self.method, self.k, self.k_ratio, self.espnet_compat, in_features, out_features)

    def rotation_sizes(self, k: int) -> tuple[int, int]:
        """(k_in, k_out) of SSVD: the inner rotation only."""
        return (self.k_in if self.k_in is not None else k), 0

    def build(self, base_layer: nn.Linear) -> SsvdAdapter:
        dims = self.dims(base_layer.in_features, base_layer.out_features)
        if self.espnet_compat:
            return EspnetSsvdAdapter(base_layer, dims.k, self.init_weights)
        return SsvdAdapter(
            base_layer, dims.k, dims.k_in, dims.k_out, self.rotation, self.neumann_terms, self.init_weights
        )

    def trainable_split(self, in_features: int, out_features: int) -> TrainableSplit:
        """values: k shifts (+1 gate with espnet_compat); inner / outer: k_side (k_side - 1) / 2."""
        dims = self.dims(in_features, out_features)
        return TrainableSplit(
            inner=num_skew_params(dims.k_in),
            outer=num_skew_params(dims.k_out),
            values=dims.k + (1 if self.espnet_compat else 0),
        )


@dataclass
class SsvdOConfig(SsvdConfig):
    """SSVD-O: SSVD plus an outer (output-side) rotation; a rotation budget split by outer_share."""

    method: ClassVar[str] = "ssvd_o"

    k_out: int | None = option(
        "size of the outer (output-side) rotation (default: from the budget)", default=None
    )
    outer_share: float = option("share rho of the rotation budget given to the outer side", default=0.5)
    rotation_budget: int | None = option(
        "rotation parameters per layer split between inner and outer (default: k(k-1)/2)", default=None
    )

    def validate(self) -> None:
        if self.espnet_compat:
            raise PeftConfigError(
                "ssvd_o: espnet_compat reproduces ESPnet's SSVDLinear, which has no outer rotation; "
                "use method 'ssvd' with espnet_compat: true"
            )
        super().validate()
        if self.k_out is not None:
            check_positive_int(self.method, "k_out", self.k_out)
        if not 0.0 <= self.outer_share <= 1.0:
            raise PeftConfigError(f"ssvd_o: outer_share must be in [0, 1], got {self.outer_share}")
        if self.rotation_budget is not None and (
            not isinstance(self.rotation_budget, int) or self.rotation_budget < 0
        ):
            raise PeftConfigError(
                f"ssvd_o: rotation_budget must be an integer >= 0, got {self.rotation_budget!r}"
            )

    def rotation_sizes(self, k: int) -> tuple[int, int]:
        """(k_in, k_out) from the rotation budget split by outer_share (explicit sizes win)."""
        budget = self.rotation_budget if self.rotation_budget is not None else num_skew_params(k)
        inner_budget, outer_budget = (1 - self.outer_share) * budget, self.outer_share * budget
        k_in = self.k_in if self.k_in is not None else min(k, rotation_size_for_budget(inner_budget))
        k_out = self.k_out if self.k_out is not None else min(k, rotation_size_for_budget(outer_budget))
        return k_in, k_out


def subspace_size(
    method: str, k: int | None, k_ratio: float, floor: bool, in_features: int, out_features: int
) -> int:
    """k of one in -> out layer: k, or round(k_ratio m) (at least 1), or floor(k_ratio m) (``floor``,
    as ESPnet's SSVDLinear; 0 is refused), with m = min(in, out); k > m is refused."""
    m = min(in_features, out_features)
    if k is None and floor:
        k = int(m * k_ratio)
        if k < 1:
            raise ValueError(
                f"{method} (espnet_compat): k_ratio {k_ratio} gives k = floor({k_ratio} x {m}) = 0 on "
                "this layer, as ESPnet's SSVDLinear would refuse; raise k_ratio or give k"
            )
    elif k is None:
        k = max(1, round(k_ratio * m))
    if k > m:
        raise ValueError(
            f"{method}: k = {k} is larger than this layer allows (min(in={in_features}, "
            f"out={out_features}) = {m}); lower k (or k_ratio), or give this module a smaller k in "
            "module_overrides"
        )
    return k


def rotation_size_for_budget(budget: float) -> int:
    """The largest j with j (j - 1) / 2 <= budget (0 when no rotation fits).

    The budget is first rounded down to whole parameters, tolerating float error from a share
    (0.2 * 15 = 2.9999999999999996 is 3 parameters).
    """
    whole = math.floor(max(budget, 0.0) + 1e-9)
    size = (1 + math.isqrt(1 + 8 * whole)) // 2
    return size if size >= 2 else 0


@dataclass
class SsvdCoreConfig(AdapterConfig):
    """A free k x k core in the top-k singular subspace: W' = W + U_k M V_k^T (what a merge of SSVD
    or SSVD-O adapters keeps). Trainable per layer: k^2."""

    method: ClassVar[str] = "ssvd_core"

    k: int | None = option("size of the singular subspace (default: k_ratio * m)", default=None)
    k_ratio: float = option("k as a fraction of m = min(in, out) when k is not given", default=0.4)
    k_floor: bool = option(
        "k = floor(k_ratio m) as ESPnet's SSVDLinear (and espnet_compat SSVD) sizes it, not round",
        default=False,
    )

    def validate(self) -> None:
        if self.k is not None:
            check_positive_int(self.method, "k", self.k)
        if not 0.0 < self.k_ratio <= 1.0:
            raise PeftConfigError(f"{self.method}: k_ratio must be in (0, 1], got {self.k_ratio}")

    def subspace_size(self, in_features: int, out_features: int) -> int:
        return subspace_size(self.method, self.k, self.k_ratio, self.k_floor, in_features, out_features)

    def build(self, base_layer: nn.Linear) -> SsvdCoreAdapter:
        k = self.subspace_size(base_layer.in_features, base_layer.out_features)
        return SsvdCoreAdapter(base_layer, k, self.init_weights)

    def trainable_split(self, in_features: int, out_features: int) -> TrainableSplit:
        """The k^2 core as SSVD-O with full rotations counts it: k values, k (k - 1) / 2 per side."""
        k = self.subspace_size(in_features, out_features)
        return TrainableSplit(inner=num_skew_params(k), outer=num_skew_params(k), values=k)


SSVD = register_method(Method("ssvd", SsvdConfig, SsvdAdapter, knob="k"))
SSVD_O = register_method(Method("ssvd_o", SsvdOConfig, SsvdAdapter, knob="k"))
SSVD_CORE = register_method(Method("ssvd_core", SsvdCoreConfig, SsvdCoreAdapter, knob="k"))
