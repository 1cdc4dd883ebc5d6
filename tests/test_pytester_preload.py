"""The pytester preload is this project's test set-up, not the plugin's: a project that installs
pytest-llem and uses pytester gets no engine loaded behind its back, while pytest-llem's own tests
(tests/conftest.py) still load it once before the first pytester."""

from __future__ import annotations

import sys
import types

import pytest

import pytest_llem.plugin

pytest_plugins = ["pytester"]

PRELOAD_MODULE = "pytest_llem.pytester_preload"


def _origin(plugin: object) -> str:
    """The module a hook implementation comes from (a plugin module, or a plugin object's)."""
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return type(plugin).__module__


def test_the_plugin_module_has_no_fixture_setup_hook() -> None:
    assert not hasattr(pytest_llem.plugin, "pytest_fixture_setup")


def test_no_llem_plugin_object_implements_fixture_setup(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfigure()
    assert config.pluginmanager.get_plugin("llem") is not None  # the plugin is loaded at all
    origins = [_origin(impl.plugin) for impl in config.hook.pytest_fixture_setup.get_hookimpls()]
    assert origins  # pytest's own fixture machinery implements it
    assert not [name for name in origins if name.startswith("pytest_llem")]


def test_a_project_using_pytester_gets_no_preload(pytester: pytest.Pytester) -> None:
    # A fresh process, so nothing this test session imported can hide a preload.
    pytester.makepyfile(
        f"""
        import sys

        pytest_plugins = ["pytester"]


        def test_uses_pytester(pytester):
            assert "pytest_llem.plugin" in sys.modules
            assert {PRELOAD_MODULE!r} not in sys.modules
            assert "transformers" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_this_projects_tests_preload_before_pytester(pytester: pytest.Pytester) -> None:
    assert PRELOAD_MODULE in sys.modules  # imported by tests/conftest.py's fixture-setup hook
