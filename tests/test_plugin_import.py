"""The plugin's own start-up cost: every pytest run in an environment with pytest-llem installed
imports ``pytest_llem.plugin``, so it must not load numpy, an engine, or the harness, meters and
backends until an llem test needs them (README "Start-up cost")."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

#: Module prefixes that only an llem test (or a comparison) may load.
HEAVY = (
    "numpy",
    "torch",
    "transformers",
    "pytest_llem.harness",
    "pytest_llem.meters",
    "pytest_llem.backends",
    "pytest_llem.report",
)

_LOADED = (
    f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {{'numpy', 'torch', "
    f"'transformers'}} or m.startswith({HEAVY!r})); "
)


def _loaded_after(statement: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after ``statement``."""
    code = f"import sys; {statement}; {_LOADED}print(heavy)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return list(ast.literal_eval(out))


def test_importing_the_plugin_loads_no_heavy_module() -> None:
    # A fresh interpreter: this one has long imported everything.
    assert _loaded_after("import pytest_llem.plugin") == []


@pytest.mark.parametrize("module", ["pytest_llem.results.compare", "pytest_llem.harness"])
def test_the_statistics_import_numpy_on_first_use(module: str) -> None:
    assert [m for m in _loaded_after(f"import {module}") if m.startswith("numpy")] == []


def test_the_check_sees_a_heavy_module() -> None:
    assert "pytest_llem.meters.registry" in _loaded_after("import pytest_llem.meters.registry")


def test_a_run_without_llem_tests_loads_no_heavy_module(pytester: pytest.Pytester) -> None:
    # Configure, collection and the run itself: the options are checked, nothing else is loaded.
    pytester.makepyfile(
        f"""
        import sys


        def test_plain():
            assert "pytest_llem.plugin" in sys.modules
            {_LOADED}
            assert heavy == []
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--llem-meter=nvml,rapl")
    result.assert_outcomes(passed=1)
