"""A conftest brings its own backend and meter through the plugin's hooks."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import time

import pytest

from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter


def pytest_llem_backend_names():
    return ["scripted"]


def pytest_llem_meter_names():
    return ["steady"]


def pytest_llem_make_backend(name, case, progress):
    if name == "scripted":
        progress("loading the scripted engine")
        return FakeBackend(FakeClock(), lengths={})
    return None


def pytest_llem_make_meter(name, config, options):
    if name == "steady":
        return FakeMeter("steady", time.perf_counter, power_w={"gpu": 100.0})
    return None
"""

TEST = """
import pytest

@pytest.mark.llem(num_prompts=4, batch_size=2, max_new_tokens=3)
def test_custom(llem):
    result = llem.run()
    assert result["output_tokens"].median == 12
"""


def test_conftest_backend_and_meter_are_used(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TEST)
    result = pytester.runpytest(
        "--llem-backend=scripted", "--llem-meter=steady", "--llem-warmup=0", "--llem-repeat=2"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["llem: loading the scripted engine", "*test_custom*scripted*steady*"]
    )
    (case,) = json.loads((pytester.path / "reports" / "llem-report.json").read_text())["cases"]
    assert case["backend"] == "scripted"
    assert case["meters"][0]["name"] == "steady"
    assert "--llem-meter=steady" in case["meters"][0]["selected_because"]
    assert case["metrics"]["gpu_energy_j"]["source"] == "measured"
    assert all(rep["gpu_energy_j"] > 0 for rep in case["repetitions"])
    assert all(rep["output_tokens"] == 12 * rep["rounds"] for rep in case["repetitions"])


def test_contributed_names_are_valid_choices(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TEST)
    result = pytester.runpytest("--llem-backend=nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*choose from: transformers, *, scripted*"])


TYPED_CONFTEST = """
import time

from pytest_llem.options import LlemOptions
from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter


def pytest_llem_backend_names():
    return ["scripted"]


def pytest_llem_meter_names():
    return ["steady"]


def pytest_llem_make_backend(name, options):
    assert isinstance(options, LlemOptions)
    print("BACKEND-OPTIONS", options.energy.cooldown, options.isolation)
    return FakeBackend(FakeClock(), lengths={}) if name == "scripted" else None


def pytest_llem_make_meter(name, options):
    assert isinstance(options, LlemOptions)
    print("METER-OPTIONS", options.energy.country_iso_code)
    return FakeMeter("steady", time.perf_counter, power_w={"gpu": 100.0}) if name == "steady" else None
"""


def test_the_factory_hooks_receive_the_typed_options(pytester: pytest.Pytester):
    pytester.makeconftest(TYPED_CONFTEST)
    pytester.makepyfile(TEST)
    result = pytester.runpytest(
        "-s",
        "--llem-backend=scripted",
        "--llem-meter=steady",
        "--llem-warmup=0",
        "--llem-repeat=2",
        "--llem-country=fra",
        "--llem-isolation=fail",
        "--llem-baseline-s=0",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*METER-OPTIONS FRA*", "*BACKEND-OPTIONS off fail*"])
