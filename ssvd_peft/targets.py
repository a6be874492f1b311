"""Matching module names against target patterns.

A pattern matches a dotted module name when it is a suffix of the name on a dot boundary
(``linear_q`` matches ``encoder.encoders.0.self_attn.linear_q``) or when it is a regular
expression that matches the whole name (``encoder\\.encoders\\.[0-3]\\..*linear_[qv]``).
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache


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
