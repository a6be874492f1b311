"""The direction of imports: layers hold math only, the core never imports espnet.

layers/            <- registry, config, methods, targets, budget, inject, checkpoint, ...
ssvd_peft (core)   <- espnet_plugins, egs
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ssvd_peft"
LAYER_MAY_IMPORT = ("ssvd_peft.layers", "ssvd_peft.model_parts", "ssvd_peft.errors")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "layers").glob("*.py")), ids=lambda p: p.name)
def test_layers_import_no_config_injection_or_registry(path: Path) -> None:
    own = {name for name in imported_modules(path) if name.startswith("ssvd_peft")}
    assert all(name.startswith(LAYER_MAY_IMPORT) for name in own), sorted(own)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_never_imports_espnet(path: Path) -> None:
    assert not {name for name in imported_modules(path) if name.split(".")[0] in ("espnet", "espnet2")}
