"""The one table of adapter methods: everything generic code needs to know about a method.

    register_method(Method("lora", LoraConfig, LoraAdapter, knob="rank"))
    method = get_method("lora")       # unknown names get the list and the nearest one

A method's home (``ssvd_peft/methods/<name>.py``) holds its config class and its entry here;
its math lives in ``ssvd_peft/layers/<name>.py``. Code outside the home asks the entry (or the
config, which builds the adapter and counts its parameters) instead of testing a method's name.
The built-in methods register when this table is first read.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ssvd_peft.errors import PeftConfigError

if TYPE_CHECKING:
    from ssvd_peft.config import AdapterConfig
    from ssvd_peft.layers.base import Adapter
    from ssvd_peft.model_parts import ModelPart

BUILTIN_METHODS = "ssvd_peft.methods"


class UnknownMethodError(PeftConfigError):
    """A method name that no registry entry has."""


@dataclass(frozen=True)
class Method:
    """One adapter method.

    name: what configs, YAML blocks and files call it; config: its config class (builds the
    adapter of one layer and counts its parameters); adapter: the class of its layer adapters
    (which says whether it has an ``exact_merge``); knob: the option ``equal_budget_configs``
    searches to meet a budget; model_part: a part that lives on the model rather than on one
    layer (HDMoLE's domain router), or None.
    """

    name: str
    config: type[AdapterConfig]
    adapter: type[Adapter]
    knob: str
    model_part: type[ModelPart] | None = None

    @property
    def exact_merge(self) -> bool:
        """The update is one weight matrix: merge, unmerge and merge_and_unload apply."""
        return self.adapter.exact_merge


_METHODS: dict[str, Method] = {}
_builtins_loaded = False


def register_method(method: Method) -> Method:
    """Add ``method`` to the table (its config class must name it); refuse a name in use."""
    _load_builtins()
    if method.name in _METHODS:
        raise ValueError(f"an adapter method named {method.name!r} is already registered")
    if method.config.method != method.name:
        raise ValueError(
            f"{method.config.__name__}.method is {method.config.method!r}, but it is registered as "
            f"{method.name!r}; give both the same name"
        )
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove ``name`` from the table (for methods registered at run time, e.g. in tests)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The entry of ``name``; an unknown name gets the known ones and the nearest match."""
    _load_builtins()
    if name not in _METHODS:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown adapter method {name!r}; choose one of {', '.join(_METHODS)}.{hint}"
        )
    return _METHODS[name]


def method_names() -> list[str]:
    """Every registered method, built-ins first, in registration order."""
    _load_builtins()
    return list(_METHODS)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module(BUILTIN_METHODS)
