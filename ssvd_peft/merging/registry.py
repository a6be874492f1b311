"""The table of merge methods: each a per-tensor function, registered by name with its knobs.

    @merge_method("task_arithmetic", knobs={"scaling": 1.0, "dare_drop": 0.0}, needs_base=True)
    def task_arithmetic(base, models, weights, *, scaling, dare_drop, generator): ...

A method sees one named tensor at a time: the base's (None for a method that needs none), the
models' stacked (T, ...) and the per-model weights (T,); it returns the merged tensor and may
overwrite the stack (so task vectors take no second stack). Computation is in float32 (float64 for
float64 tensors); the engine casts the result back to the stored dtype. ``subspace``
marks the methods that act on a 2-D weight through its singular vectors (every other tensor takes
the mean of the task vectors, by the tensor rules of ``ssvd_peft.merging.rules``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ssvd_peft.errors import PeftConfigError

TensorMerge = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """name; function(base, models, weights, *, generator, **knobs); knobs with their defaults;
    needs_base: works on task vectors theta_t - theta_0; subspace: works through an SVD of 2-D weights."""

    name: str
    function: TensorMerge
    knobs: dict[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    subspace: bool = False

    def resolved_knobs(self, given: dict[str, Any]) -> dict[str, Any]:
        """The method's knobs with ``given`` in place of the defaults; an unknown knob is refused."""
        unknown = sorted(set(given) - set(self.knobs))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.knobs), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            known = ", ".join(self.knobs) or "none"
            raise PeftConfigError(
                f"merge method {self.name!r} has no knob {unknown[0]!r}.{hint} Its knobs: {known}"
            )
        return {**self.knobs, **given}


_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str, knobs: dict[str, Any] | None = None, needs_base: bool = True, subspace: bool = False
) -> Callable[[TensorMerge], TensorMerge]:
    """Register the decorated per-tensor function as merge method ``name``."""

    def register(function: TensorMerge) -> TensorMerge:
        if name in _METHODS:
            raise ValueError(f"a merge method named {name!r} is already registered")
        _METHODS[name] = MergeMethod(name, function, dict(knobs or {}), needs_base, subspace)
        return function

    return register


def get_merge_method(name: str) -> MergeMethod:
    """The entry of ``name``; an unknown name gets the known ones and the nearest match."""
    if name not in _METHODS:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PeftConfigError(f"unknown merge method {name!r}; choose one of {', '.join(_METHODS)}.{hint}")
    return _METHODS[name]


def merge_method_names() -> list[str]:
    return list(_METHODS)
