"""The package's public names: all importable, and imported only when first used."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pytest_llem

__all__: list[str] = []


@pytest.mark.parametrize("name", pytest_llem.__all__)
def test_every_public_name_resolves_to_its_defining_object(name: str) -> None:
    value = getattr(pytest_llem, name)
    if name != "__version__":
        assert value.__module__.startswith("pytest_llem.")
        assert value is getattr(sys.modules[value.__module__], name)
    assert name in dir(pytest_llem)


def test_from_import_and_star_import_work() -> None:
    from pytest_llem import CaseConfig, LlemError, load_run

    namespace: dict[str, object] = {}
    exec("from pytest_llem import *", namespace)
    assert {"CaseConfig", "LlemError", "load_run"} <= set(namespace)
    assert namespace["CaseConfig"] is CaseConfig
    assert callable(load_run)
    assert issubclass(LlemError, Exception)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = pytest_llem.no_such_name  # type: ignore[attr-defined]


def test_importing_a_submodule_does_not_load_the_public_api() -> None:
    # A fresh interpreter: this one has long imported everything.
    code = (
        "import sys, pytest_llem.exceptions; "
        "heavy = [m for m in ('pytest_llem.config.models', 'pytest_llem.report.loading', "
        "'pytest_llem.results.models', 'pydantic') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
