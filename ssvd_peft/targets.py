"""Matching module names against target patterns, and finding the layers a config targets.

A pattern matches a dotted module name when it is a suffix of the name on a dot boundary
(``linear_q`` matches ``encoder.encoders.0.self_attn.linear_q``) or when it is a regular
expression that matches the whole name (``encoder\\.encoders\\.[0-3]\\..*linear_[qv]``).
``find_target_layers`` applies a config's ``target_modules`` and ``exclude_modules`` to a model
and refuses a pattern that matches nothing (naming the closest modules), non-Linear matches and
layers whose forward is never called.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING

from torch import nn

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.layers.base import ADAPTERS_ATTR, AdapterLinear

if TYPE_CHECKING:
    from ssvd_peft.config import AdapterConfig


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` is a dot-suffix of ``name`` or a regex that fully matches it."""
    if name == pattern or name.endswith("." + pattern):
        return True
    regex = _compiled(pattern)
    return regex is not None and regex.fullmatch(name) is not None


def matches_any(patterns: list[str], name: str) -> bool:
    return any(matches(pattern, name) for pattern in patterns)


def closest_names(pattern: str, names: list[str], limit: int = 5) -> list[str]:
    """The module names that look most like ``pattern`` (by full name and by last segment)."""
    by_full = difflib.get_close_matches(pattern, names, n=limit, cutoff=0.4)
    leaves = sorted({leaf for leaf in (name.rsplit(".", 1)[-1] for name in names) if not leaf.isdigit()})
    by_leaf = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], leaves, n=limit, cutoff=0.4)
    return list(dict.fromkeys(by_leaf + by_full))[:limit]


def find_target_layers(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The linear layers (plain or already wrapped) that ``config`` targets, by module name."""
    candidates = dict(_candidate_modules(model))
    targets: dict[str, nn.Module] = {}
    for pattern in config.target_modules:
        matched = {name: module for name, module in candidates.items() if matches(pattern, name)}
        if not matched:
            close = closest_names(pattern, list(candidates))
            hint = f" Closest module names: {', '.join(close)}." if close else ""
            raise PeftConfigError(
                f"target pattern {pattern!r} matches no module of {type(model).__name__}.{hint} "
                "Use a dot-suffix of a module name (linear_q) or a regex for the full name; "
                "`ssvd-peft modules` lists the candidates."
            )
        linear = {name: module for name, module in matched.items() if _is_linear(module)}
        if not linear:
            inside = [
                f"{name}.{child}"
                for name, module in matched.items()
                for child, sub in module.named_modules()
                if child and _is_linear(sub)
            ]
            hint = f" Linear layers inside: {', '.join(inside[:3])}." if inside else ""
            examples = ", ".join(
                f"{name} ({type(module).__name__})" for name, module in list(matched.items())[:3]
            )
            raise PeftConfigError(
                f"target pattern {pattern!r} matches only modules that are not nn.Linear: {examples}. "
                f"Adapters wrap nn.Linear layers; target the Linear layers inside them.{hint}"
            )
        targets.update(linear)
    names = [name for name, _ in model.named_modules() if name]
    for pattern in config.exclude_modules:
        if not any(matches(pattern, name) for name in names):
            raise PeftConfigError(
                f"exclude pattern {pattern!r} matches no module of {type(model).__name__}, so it excludes "
                "nothing. Use a dot-suffix of a module name (linear_q) or a regex for the full name "
                r"(decoder\..* for every module under decoder)."
            )
    targets = {
        name: module
        for name, module in candidates.items()
        if name in targets and not matches_any(config.exclude_modules, name)
    }
    if not targets:
        raise PeftConfigError(
            f"exclude_modules {config.exclude_modules} removes every target; nothing is left to adapt"
        )
    for name in targets:
        _check_forward_is_called(model, name)
    return targets


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules a pattern may target: everything but the insides of wrappers."""
    for name, module in model.named_modules():
        if not name or ".base_layer" in f".{name}" or ADAPTERS_ATTR in name.split("."):
            continue
        yield name, module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | AdapterLinear)


def _check_forward_is_called(model: nn.Module, name: str) -> None:
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        raise PeftConfigError(
            f"module {name!r} belongs to torch.nn.MultiheadAttention, which reads its weight "
            "directly and never calls its forward, so an adapter there would do nothing. "
            "Exclude it (exclude_modules) or adapt the layers around the attention."
        )
