"""The option table row by row: each option's flag, ini key, parser and error messages, and the
command line winning over the ini file. Every row must have an example below, so a new option
is covered (or this file fails until it is)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_llem.exceptions import ConfigurationError
from pytest_llem.options import (
    OPTIONS,
    CooldownSpec,
    EnergyOptions,
    LlemOptions,
    Option,
    OptionValues,
    build_options,
    option,
)
from pytest_llem.options.parsers import Assignment, SweepAxis
from pytest_llem.results.drift import DriftMargin
from pytest_llem.sharding import ShardSpec

pytest_plugins = ["pytester"]

#: Per option: a good text, the value it parses to, and a bad text with a fragment of its
#: message (None: every text is a value, or the option is a flag).
EXAMPLES: dict[str, tuple[Any, Any, tuple[str, str] | None]] = {
    "backend": ("vllm", ("vllm",), (" , ", "expected a name or names")),
    "model": ("llem-tiny", "llem-tiny", None),
    "device": ("cpu", "cpu", ("tpu", "'auto', 'cpu' or 'cuda'")),
    "meter": ("nvml, rapl", ("nvml", "rapl"), (",", "expected a name or names")),
    "repeat": ("2", 2, ("0", "greater than or equal to 1")),
    "warmup": ("0", 0, ("-1", "greater than or equal to 0")),
    "max_repeat": ("12", 12, ("2", "expected a whole number of windows, 3 <= N <= 10000")),
    "max_case_s": ("90", 90.0, ("-5", "expected seconds")),
    "target_ci": ("2.5%", 0.025, ("0%", "expected a relative width such as 5% or 0.05")),
    "report_dir": ("out", Path("out"), None),
    "baseline_s": ("1.5", 1.5, ("inf", "expected seconds, 0 <= N <= 604800")),
    "min_window_s": ("0", 0.0, ("soon", "expected seconds")),
    "cooldown": (
        "seconds:3",
        CooldownSpec(mode="seconds", seconds=3.0),
        ("lukewarm", "expected off, temperature or seconds:N"),
    ),
    "country": ("fra", "FRA", ("France", "expected a three-letter ISO code")),
    "gpus": ("0-1,2-3", ((0, 1), (2, 3)), ("zero", "'zero' is not a GPU index")),
    "isolation": ("SKIP", "skip", ("maybe", "expected one of warn, skip, fail")),
    "profile": ("Standard", "standard", ("huge", "expected one of smoke, standard, full, auto")),
    "timeout_s": ("60", 60.0, ("-1", "expected seconds")),
    "endpoint": ("http://127.0.0.1:8000/", "http://127.0.0.1:8000", ("ftp://x", "endpoint.url")),
    "set": (
        "batch_size=8",
        Assignment("batch_size", 8, "batch_size=8"),
        ("batch_sz=8", "unknown parameter 'batch_sz'"),
    ),
    "sweep": (
        "batch_size=1,2",
        SweepAxis("batch_size", (1, 2), "batch_size=1,2"),
        ("batch_size", "expected KEY=V1,V2"),
    ),
    "shard": ("2/3", ShardSpec(2, 3), ("4/3", "expected K/N with 1 <= K <= N")),
    "shuffle": ("7", 7, ("-1", "the seed must be >= 0")),
    "save": ("nightly", "nightly", None),
    "autosave": (True, True, None),
    "storage": ("runs", Path("runs"), None),
    "compare": ("latest", "latest", None),
    "fail_on": (
        "energy_per_output_token_j:+5%",
        None,  # a rule: checked below by its text
        ("nonsense", "fail-on part 'nonsense'"),
    ),
    "fail_inconclusive": (True, True, None),
    "calibrate": ("3", 3, ("1", "expected a number of runs, 2 <= N <= 100")),
    "gate_estimated": (True, True, None),
    "compare_strict": (True, True, None),
    "drift_margin": (
        "cpu=1,gpu_clock=5%",
        DriftMargin(cpu_cores=1.0, gpu_clock=0.05),
        ("cpu=lots", "cpu: 'lots' is not a number"),
    ),
    "csv": ("out.csv", "out.csv", None),
}

ROWS = [pytest.param(row, id=row.name) for row in OPTIONS]
BAD = [
    pytest.param(row, *EXAMPLES[row.name][2], id=row.name)
    for row in OPTIONS
    if EXAMPLES.get(row.name, (None, None, None))[2] is not None
]
INI_BAD = [p for p in BAD if p.values[0].ini_key is not None]
INI_VALUES = [p for p in ROWS if p.values[0].ini_key is not None and p.values[0].form == "value"]


def test_every_option_has_an_example():
    assert sorted(EXAMPLES) == sorted(row.name for row in OPTIONS)


@pytest.mark.parametrize("row", ROWS)
def test_flag_dest_and_ini_key_follow_the_name(row: Option[Any]):
    assert row.flag == "--llem-" + row.name.replace("_", "-")
    assert row.dest == f"llem_{row.name}"
    assert row.ini_key in (None, f"llem_{row.name}")
    assert (row.ini_key is None) == (row.form in ("flag", "optional") or row.name == "fail_on")
    assert row.help.strip()
    assert option(row.name) is row


@pytest.mark.parametrize("row", ROWS)
def test_each_parser_reads_its_good_example(row: Option[Any]):
    text, expected, _ = EXAMPLES[row.name]
    values = OptionValues.from_text({row.name: [text] if row.form == "lines" else text}, {})
    found = values.lines(row) if row.form == "lines" else values.cli(row)
    if row.form == "lines":
        assert found == (expected,)
    elif row.name == "fail_on":
        assert [rule.text for rule in found] == [text]
    else:
        assert found == expected


@pytest.mark.parametrize(("row", "bad", "message"), BAD)
def test_a_bad_value_on_the_command_line_names_the_flag(row: Option[Any], bad: str, message: str):
    with pytest.raises(pytest.UsageError) as info:
        row.parse_argument(bad)
    text = str(info.value)
    assert text.startswith(f"pytest-llem: {row.flag}")
    assert message in text
    if row.form == "lines":
        assert f"{row.flag} {bad}:" in text  # which of several lines


@pytest.mark.parametrize(("row", "bad", "message"), INI_BAD)
def test_a_bad_ini_value_names_the_ini_key_through_the_same_parser(
    row: Option[Any], bad: str, message: str
):
    raw = [bad] if row.form == "lines" else bad
    with pytest.raises(ConfigurationError) as info:
        OptionValues.from_text({}, {row.name: raw})
    text = str(info.value)
    assert text.startswith(f"ini option llem_{row.name}")
    assert message in text
    assert row.flag not in text


@pytest.mark.parametrize("row", INI_VALUES)
def test_the_command_line_wins_over_the_ini_file_over_the_default(row: Option[Any]):
    text, expected, _ = EXAMPLES[row.name]
    both = OptionValues.from_text({row.name: text}, {row.name: text})
    chosen = both.chosen(row)
    assert (chosen.origin, chosen.from_command_line) == (row.flag, True)
    ini_only = OptionValues.from_text({}, {row.name: text}).chosen(row)
    assert (ini_only.origin, ini_only.from_command_line) == (row.ini_origin, False)
    if row.name != "fail_on":
        assert ini_only.value == expected
    neither = OptionValues.from_text({}, {}).chosen(row)
    assert neither.value == row.default
    assert neither.origin == f"the default of {row.flag}"


def test_the_command_line_value_is_the_one_used():
    options = build_options(
        cli={"cooldown": "seconds:2", "isolation": "fail", "baseline_s": "1"},
        ini={"cooldown": "temperature", "isolation": "skip", "country": "fra", "baseline_s": "9"},
        invocation_dir=Path.cwd(),
    )
    assert options.energy.cooldown == CooldownSpec(mode="seconds", seconds=2.0)
    assert options.isolation == "fail"
    assert options.energy.country_iso_code == "FRA"
    assert (options.energy.baseline_s, options.energy.baseline_forced) == (1.0, True)
    assert options.origin("cooldown") == "--llem-cooldown"
    assert options.origin("country") == "ini option llem_country"
    assert options.origin("report_dir") == "the default of --llem-report-dir"
    assert options.given["command_line"]["cooldown"] == "seconds:2"
    assert options.given["ini"]["isolation"] == "skip"


def test_the_options_are_frozen():
    options = build_options(cli={}, ini={}, invocation_dir=Path.cwd())
    with pytest.raises(ValueError, match="frozen"):
        options.isolation = "skip"  # type: ignore[misc]
    assert isinstance(options, LlemOptions)


def test_create_meter_takes_the_country_from_the_options(monkeypatch: pytest.MonkeyPatch):
    from pytest_llem.meters import registry

    made: list[str] = []
    monkeypatch.setattr(registry, "CodeCarbonMeter", lambda country: made.append(country))
    registry.create_meter("codecarbon", options=EnergyOptions(country_iso_code="FRA"))
    registry.create_meter("codecarbon")
    assert made == ["FRA", "USA"]


PROBE = """
def test_probe(request):
    from pytest_llem.fixtures import SESSION_KEY

    options = request.config.stash[SESSION_KEY].options
    cooldown = request.config.getoption("llem_cooldown")
    print("COOLDOWN=" + type(cooldown).__name__ + " " + str(cooldown))
    print("CHOSEN=" + str(options.energy.cooldown) + "/" + options.isolation)
"""


def test_argparse_stores_the_parsed_value_and_the_command_line_wins(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nllem_cooldown = temperature\nllem_isolation = skip\n")
    pytester.makepyfile(PROBE)
    result = pytester.runpytest("-s", "--llem-cooldown=seconds:2")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*COOLDOWN=CooldownSpec seconds:2", "CHOSEN=seconds:2/skip"])


@pytest.mark.parametrize(("row", "bad", "message"), BAD)
def test_a_bad_command_line_value_stops_pytest_with_exit_4(
    pytester: pytest.Pytester, row: Option[Any], bad: str, message: str
):
    pytester.makepyfile(PROBE)
    result = pytester.runpytest(f"{row.flag}={bad}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*pytest-llem: {row.flag}*{message}*"])


@pytest.mark.parametrize(("row", "bad", "message"), INI_BAD)
def test_a_bad_ini_value_stops_pytest_with_exit_4(
    pytester: pytest.Pytester, row: Option[Any], bad: str, message: str
):
    pytester.makeini(f"[pytest]\n{row.ini_key} = {bad}\n")
    pytester.makepyfile(PROBE)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*pytest-llem: ini option {row.ini_key}*{message}*"])
    result.stderr.no_fnmatch_line(f"*{row.flag}*")


def test_help_lists_every_flag_and_ini_key(pytester: pytest.Pytester):
    text = pytester.runpytest("--help").stdout.str()
    for row in OPTIONS:
        assert row.flag in text
        assert row.ini_key is None or row.ini_key in text
