"""Parsers of the plugin's option values, one per kind of value.

Each takes the text a user wrote (on the command line or in the ini file) and returns the typed
value, or raises :class:`~pytest_llem.exceptions.ConfigurationError` saying what is wrong; the
option table (:mod:`pytest_llem.options.table`) adds which flag or ini key the text came from.
argparse runs them as ``type=`` when it parses the command line.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from pytest_llem.config.resolve import check_value, parse_assignment
from pytest_llem.exceptions import ConfigurationError, GateError
from pytest_llem.options.model import MAX_SECONDS, CooldownSpec

if TYPE_CHECKING:
    from pytest_llem.results.drift import DriftMargin
    from pytest_llem.results.gate import GateRule
    from pytest_llem.sharding import ShardSpec

__all__ = [
    "Assignment",
    "SweepAxis",
    "case_value",
    "parse_assignment_line",
    "parse_cooldown",
    "parse_country",
    "parse_drift_margin",
    "parse_fail_on",
    "parse_gpus",
    "parse_isolation",
    "parse_max_repeat",
    "parse_names",
    "parse_path",
    "parse_profile",
    "parse_runs",
    "parse_seconds",
    "parse_seed",
    "parse_shard",
    "parse_sweep_line",
    "parse_target_ci",
    "parse_text",
]


@dataclass(frozen=True)
class Assignment:
    """One ``KEY=VALUE`` line of ``--llem-set`` / ``llem_set``, checked on its own."""

    path: str
    value: Any
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class SweepAxis:
    """One ``KEY=V1,V2`` line of ``--llem-sweep`` / ``llem_sweep``: a parameter and its values."""

    path: str
    values: tuple[Any, ...]
    text: str

    def __str__(self) -> str:
        return self.text


def parse_text(text: str) -> str:
    """Any text, surrounding blanks removed."""
    return text.strip()


def parse_path(text: str) -> Path:
    """A path; a relative one is taken from the invocation folder later."""
    return Path(text.strip())


def parse_names(text: str) -> tuple[str, ...]:
    """One name or several joined with commas (``nvml,rapl``); which names exist is known only
    once every plugin has said which it provides, so that is checked later."""
    names = tuple(part.strip() for part in text.split(","))
    if not any(names):
        raise ConfigurationError(f"expected a name or names joined with commas, got {text!r}")
    return tuple(name for name in names if name)


def case_value(path: str) -> Callable[[str], Any]:
    """A parser for an option that sets the case parameter ``path`` (``--llem-repeat``...):
    the parameter's own type, bounds and choices decide."""

    def parse(text: str) -> Any:
        return check_value(path, text.strip())

    parse.__name__ = f"case_value[{path}]"
    return parse


def parse_seconds(text: str) -> float:
    """A finite number of seconds from 0 to :data:`~pytest_llem.options.model.MAX_SECONDS`.

    Infinity would overflow the timers a timeout arms and ``sleep``; beyond a week a value is
    a typo (milliseconds given as seconds, say), not a measurement plan.
    """
    expected = f"expected seconds, 0 <= N <= {MAX_SECONDS:g} (7 days), got {text!r}"
    try:
        value = float(text.strip())
    except ValueError as e:
        raise ConfigurationError(expected) from e
    if not (0 <= value <= MAX_SECONDS):  # also false for nan
        raise ConfigurationError(expected)
    return value


def _bounded_int(text: str, low: int, high: int, what: str) -> int:
    expected = f"expected a {what}, {low} <= N <= {high}, got {text!r}"
    try:
        value = int(text.strip())
    except ValueError as e:
        raise ConfigurationError(expected) from e
    if not low <= value <= high:
        raise ConfigurationError(expected)
    return value


def parse_max_repeat(text: str) -> int:
    """The most windows of an adaptive case: a whole number from 3 (the first look) to 10000."""
    return _bounded_int(text, 3, 10_000, "whole number of windows")


def parse_target_ci(text: str) -> float:
    """A relative half-width: ``5%`` or ``0.05``, above 0 and below 100%."""
    raw = text.strip()
    expected = f"expected a relative width such as 5% or 0.05 (above 0, below 100%), got {text!r}"
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError as e:
        raise ConfigurationError(expected) from e
    if not 0 < value < 1:  # also false for nan
        raise ConfigurationError(expected)
    return value


def parse_cooldown(text: str) -> CooldownSpec:
    """``off``, ``temperature`` or ``seconds:N``."""
    raw = text.strip().lower()
    if raw in ("off", "temperature"):
        return CooldownSpec(mode="off" if raw == "off" else "temperature")
    if raw.startswith("seconds:"):
        try:
            return CooldownSpec(mode="seconds", seconds=parse_seconds(raw.split(":", 1)[1]))
        except ConfigurationError:
            pass  # the message below names every accepted form
    raise ConfigurationError(
        f"expected off, temperature or seconds:N (0 <= N <= {MAX_SECONDS:g}), got {text!r}"
    )


def parse_country(text: str) -> str:
    """A three-letter ISO country code, upper case."""
    country = text.strip().upper()
    if not (len(country) == 3 and country.isalpha()):
        raise ConfigurationError(
            f"expected a three-letter ISO code such as USA or FRA, got {country!r}"
        )
    return country


def parse_isolation(text: str) -> str:
    """``warn``, ``skip`` or ``fail``."""
    from pytest_llem.harness.isolation import ISOLATION_MODES

    mode = text.strip().lower()
    if mode not in ISOLATION_MODES:
        raise ConfigurationError(f"expected one of {', '.join(ISOLATION_MODES)}, got {mode!r}")
    return mode


def parse_gpus(text: str) -> tuple[tuple[int, ...], ...]:
    """GPU groups, one per xdist worker: ``0,1,2,3`` or ``0-1,2-3``."""
    from pytest_llem.workers import parse_gpu_groups

    groups = parse_gpu_groups(text, option=None)
    if groups is None:
        raise ConfigurationError("no GPU given")
    return groups


#: The most runs ``--llem-calibrate`` takes (each is a whole measured run of every case).
MAX_CALIBRATION_RUNS = 100


def parse_runs(text: str) -> int:
    """A number of independent runs for ``--llem-calibrate``: 2 to 100 (A/A pairs need two)."""
    return _bounded_int(text, 2, MAX_CALIBRATION_RUNS, "number of runs")


def parse_seed(text: str) -> int:
    """A shuffle seed; ``random`` (or nothing) draws a fresh one, which the record keeps."""
    raw = text.strip()
    if raw in ("", "random"):
        return random.SystemRandom().randrange(2**32)
    try:
        seed = int(raw)
    except ValueError as e:
        raise ConfigurationError(f"expected an integer seed, got {text!r}") from e
    if seed < 0:
        raise ConfigurationError(f"the seed must be >= 0, got {seed}")
    return seed


def parse_shard(text: str) -> ShardSpec:
    """``K/N``: shard K of N, ``1 <= K <= N``."""
    from pytest_llem.sharding import parse_shard as parse

    return parse(text)


def parse_fail_on(text: str) -> tuple[GateRule, ...]:
    """Regression thresholds, e.g. ``energy_per_output_token_j:+5%,ttft_ms.p99:+10%``."""
    from pytest_llem.results.gate import parse_fail_on as parse_rules

    try:
        return tuple(parse_rules(text))
    except GateError as e:
        raise ConfigurationError(str(e)) from e


def parse_drift_margin(text: str) -> DriftMargin:
    """The drift margin: ``0.5`` (cores), ``cpu=0.5,gpu_clock=10%`` or ``off``."""
    from pytest_llem.results.drift import parse_drift_margin as parse_margin

    try:
        return parse_margin(text)
    except ValueError as e:
        raise ConfigurationError(str(e)) from e


def parse_assignment_line(text: str) -> Assignment:
    """A ``KEY=VALUE`` line: a known parameter and a value it can take."""
    path, value = parse_assignment(text)
    checked = check_value(path, value)
    # Groups (sampling, transformers) stay plain dicts so layers merge key by key.
    return Assignment(path, value if isinstance(checked, BaseModel) else checked, text)


def parse_sweep_line(text: str) -> SweepAxis:
    """A ``KEY=V1,V2`` (or ``KEY=auto``) line: a known parameter and values it can take."""
    from pytest_llem.sweep import merge_axes, parse_sweep_option

    key, values = parse_sweep_option(text)
    ((path, checked),) = merge_axes([{key: values}]).items()
    return SweepAxis(path, tuple(checked), text)


def parse_profile(text: str) -> str:
    """``smoke``, ``standard``, ``full`` or ``auto``."""
    from pytest_llem.config.profiles import PROFILES

    name = text.strip().lower()
    choices = (*PROFILES, "auto")
    if name not in choices:
        raise ConfigurationError(f"expected one of {', '.join(choices)}, got {name!r}")
    return name
