"""The one-way arrows of docs/architecture.md, checked on the source: a package imports only
from the layers below it (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_llem"

#: What each lower layer may import (besides itself, ``exceptions`` and the package's
#: ``__version__``); the pytest side and
#: the ``llem`` command, at the top, may import anything.
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "data": {"config"},
    "results": {"config"},
    "report": {"results", "config"},
    "meters": {"results", "config"},
    "backends": {"data", "config"},
    "harness": {"backends", "meters", "results", "data", "config"},
}


def _imports(path: Path) -> set[str]:
    """The ``pytest_llem`` subpackages or top-level modules a file imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "pytest_llem":
                names = [f"pytest_llem.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "pytest_llem":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for target in _imports(path) - ALLOWED[layer] - {layer, "exceptions", "__version__"}:
            wrong.append(f"{path.relative_to(PACKAGE)} imports pytest_llem.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from pytest_llem.harness.runner import run_case\n"
        "def f():\n    from pytest_llem.meters import nvml\n"
        "from pytest_llem import __version__\n"
    )
    assert _imports(module) == {"harness", "meters", "__version__"}
