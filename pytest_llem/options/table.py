"""The option table: every ``--llem-*`` option and ``llem_*`` ini key, one row each.

A row gives the flag, the ini key, the help, the parser of the value, the default and the
``dest`` pytest stores the command line's value under. The same rows register the options with
pytest (:func:`add_options`; argparse runs each parser as ``type=``, so a bad value on the command
line is a usage error before any test is collected); :mod:`pytest_llem.options.values` reads the
ini values through the same parsers and lets the command line win over the ini file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import pytest

from pytest_llem.exceptions import ConfigurationError
from pytest_llem.options.model import (
    DEFAULT_BASELINE_S,
    DEFAULT_MAX_REPEAT,
    DEFAULT_MIN_WINDOW_S,
    DEFAULT_REPORT_DIR,
    DEFAULT_STORAGE,
    DEFAULT_TARGET_CI,
    CooldownSpec,
)
from pytest_llem.options.parsers import (
    case_value,
    parse_assignment_line,
    parse_cooldown,
    parse_country,
    parse_drift_margin,
    parse_fail_on,
    parse_gpus,
    parse_isolation,
    parse_max_repeat,
    parse_names,
    parse_path,
    parse_profile,
    parse_runs,
    parse_seconds,
    parse_seed,
    parse_shard,
    parse_sweep_line,
    parse_target_ci,
    parse_text,
)
from pytest_llem.results.drift import MARGIN_HELP

__all__ = [
    "OPTIONS",
    "Option",
    "add_options",
    "option",
]

T = TypeVar("T")

#: How an option takes its value: ``value`` (one, ini key too), ``lines`` (repeatable, ini key
#: with one per line), ``flag`` (on or off) or ``optional`` (the value may be left out: ``const``).
Form = Literal["value", "lines", "flag", "optional"]


def _shown(value: Any) -> Any:
    """A parsed value as the run record shows it: the text it stands for."""
    if isinstance(value, bool | list):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_shown(part) for part in value)
    return str(getattr(value, "text", value))


def _shown_groups(groups: tuple[tuple[int, ...], ...]) -> str:
    return ",".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


@dataclass(frozen=True)
class Option(Generic[T]):
    """One row of the option table.

    ``parse`` turns the text a user wrote into the value (raising ConfigurationError); ``default``
    is the value when neither the command line nor the ini file gives one (None: the case
    parameter's own default applies, or the option is off).
    """

    name: str
    help: str
    parse: Callable[[str], T]
    default: T | None = None
    metavar: str | None = None
    form: Form = "value"
    const: str | None = None
    ini: bool = True
    ini_help: str | None = None
    show: Callable[[Any], Any] = _shown
    env: str | None = None

    @property
    def flag(self) -> str:
        """The command-line flag, ``--llem-NAME``."""
        return f"--llem-{self.name.replace('_', '-')}"

    @property
    def dest(self) -> str:
        """Where pytest keeps the command line's value (``config.option.llem_NAME``)."""
        return f"llem_{self.name}"

    @property
    def ini_key(self) -> str | None:
        """The ini key, ``llem_NAME``; None for a command-line-only option."""
        return f"llem_{self.name}" if self.ini else None

    @property
    def env_origin(self) -> str:
        """How a message names the environment variable."""
        return f"environment variable {self.env}"

    @property
    def ini_origin(self) -> str:
        """How a message names the ini key."""
        return f"ini option llem_{self.name}"

    def read(self, text: str, origin: str) -> T | None:
        """Parse one value (one line for a ``lines`` option) that ``origin`` gave.

        Returns:
            The value; None for a blank ``value`` (not given).

        Raises:
            ConfigurationError: naming ``origin`` (and the line, for a ``lines`` option).
        """
        if self.form == "value" and not text.strip():
            return None
        try:
            return self.parse(text)
        except ConfigurationError as e:
            where = f"{origin} {text}" if self.form == "lines" else origin
            raise ConfigurationError(f"{where}: {e}") from e

    def parse_argument(self, text: str) -> T | None:
        """argparse's ``type=``: a bad value stops pytest with a usage error naming the flag."""
        try:
            return self.read(text, self.flag)
        except ConfigurationError as e:
            raise pytest.UsageError(f"pytest-llem: {e}") from e


def _row(name: str, help: str, parse: Callable[[str], T], **kwargs: Any) -> Option[T]:
    return Option(name, help, parse, **kwargs)


#: Every option of the plugin, in the order ``--help`` lists them.
OPTIONS: tuple[Option[Any], ...] = (
    _row("backend", "Inference backend for every case (default: transformers).", parse_names),
    _row(
        "model",
        "Model for every case: llem-tiny (built-in), a folder, or a hub id.",
        case_value("model"),
    ),
    _row("device", "Device: auto, cpu or cuda (default: auto).", case_value("device")),
    _row(
        "meter",
        "Energy meter(s): auto, nvml, rapl, zeus, codecarbon or none, or several joined with "
        "commas (nvml,rapl); each domain is taken from one meter (default: auto).",
        parse_names,
        default=("auto",),
        metavar="NAME[,NAME]",
    ),
    _row(
        "repeat",
        "Measured repetitions per case, or auto: measure windows until the gate's verdicts are "
        "decided (or, without a gate, the intervals are narrower than --llem-target-ci), up to "
        "--llem-max-repeat and --llem-max-case-s (default: 3).",
        case_value("repeat"),
        metavar="N|auto",
    ),
    _row(
        "warmup",
        "Unmeasured warmup repetitions per case (default: 1).",
        case_value("warmup"),
        metavar="N",
    ),
    _row(
        "max_repeat",
        "With repeat=auto: the most windows a case measures (default: 30).",
        parse_max_repeat,
        default=DEFAULT_MAX_REPEAT,
        metavar="N",
    ),
    _row(
        "max_case_s",
        "With repeat=auto: stop adding windows when the next would take a case's warmup and "
        "windows past this many seconds; 3 windows always run (default: no limit).",
        parse_seconds,
        metavar="SECONDS",
    ),
    _row(
        "target_ci",
        "With repeat=auto and no gate: stop once every reported metric's interval is narrower "
        "than this either side of its median, e.g. 5%% or 0.05 (default: 5%%).",
        parse_target_ci,
        default=DEFAULT_TARGET_CI,
        metavar="FRACTION",
        ini_help="With repeat=auto and no gate: the relative interval half-width to reach, "
        "e.g. 5% or 0.05 (default: 5%). Overridden by --llem-target-ci.",
    ),
    _row(
        "report_dir",
        "Folder for llem-report.json and runs/ (default: reports).",
        parse_path,
        default=Path(DEFAULT_REPORT_DIR),
        metavar="DIR",
    ),
    _row(
        "baseline_s",
        "Seconds of idle power measured before the first case, for dynamic energy; cached per "
        "machine for an hour unless given here; 0 disables (default: 5).",
        parse_seconds,
        default=DEFAULT_BASELINE_S,
        metavar="SECONDS",
    ),
    _row(
        "min_window_s",
        "Shortest measurement window: the workload repeats inside a window until it lasts "
        "max(this, 20 x the meter's update period) (default: 0, the meters' resolution decides).",
        parse_seconds,
        default=DEFAULT_MIN_WINDOW_S,
        metavar="SECONDS",
    ),
    _row(
        "cooldown",
        "Before each case: off, temperature (wait until the GPU is near its idle temperature) "
        "or seconds:N (default: off).",
        parse_cooldown,
        default=CooldownSpec(),
        metavar="MODE",
    ),
    _row(
        "country",
        "Country (ISO code, e.g. USA, FRA) for CodeCarbon's emissions.",
        parse_country,
        metavar="ISO",
    ),
    _row(
        "gpus",
        "GPUs per xdist worker, e.g. 0,1,2,3 (one each) or 0-1,2-3 (two each): worker N sees "
        "only group N (CUDA_VISIBLE_DEVICES).",
        parse_gpus,
        metavar="LIST",
        show=_shown_groups,
    ),
    _row(
        "profile",
        "Workload size of the suites: smoke (the tiny CPU test), standard (realistic lengths, "
        "about 30 minutes for a 7-8B model on one H100), full (the published grid), or auto: "
        "smoke without a CUDA GPU, standard with one (docs/profiles.md; default: auto).",
        parse_profile,
        default="auto",
        metavar="NAME",
    ),
    _row(
        "isolation",
        "Other processes on a measured GPU: warn, skip or fail the case (default: warn).",
        parse_isolation,
        default="warn",
        metavar="MODE",
    ),
    _row(
        "timeout_s",
        "Fail a case whose warmup and measured windows run longer than this; model loading, "
        "the idle baseline and the cooldown do not count. The session goes on (default: no "
        "limit).",
        parse_seconds,
        metavar="SECONDS",
    ),
    _row(
        "endpoint",
        "Benchmark an OpenAI-compatible server running on this machine, e.g. "
        "http://127.0.0.1:8000 (selects the endpoint backend unless a backend is given).",
        case_value("endpoint.url"),
        metavar="URL",
    ),
    _row(
        "set",
        "Set any case parameter, e.g. batch_size=8 or transformers.attn_implementation=sdpa "
        "(repeatable; wins over ini, llem.run() overrides and markers, and replaces a marker's "
        "or the ini's sweep axis of the same parameter).",
        parse_assignment_line,
        form="lines",
        metavar="KEY=VALUE",
        ini_help="Case parameters as KEY=VALUE lines.",
    ),
    _row(
        "sweep",
        "Sweep a parameter over values for every llem test (KEY=auto takes the values the "
        "models define); repeatable, replaces a marker's or the ini's axis of the same "
        "parameter and wins over llem.run() overrides.",
        parse_sweep_line,
        form="lines",
        metavar="KEY=V1,V2",
        ini_help="Sweep axes as KEY=V1,V2 lines.",
    ),
    _row(
        "shard",
        "Run shard K of N of the session: whole model-load groups are assigned to N shards, "
        "balanced by expected cost, the same on every node; the other cases are deselected "
        "(also env LLEM_SHARD; command line > env > ini).",
        parse_shard,
        metavar="K/N",
        env="LLEM_SHARD",
        ini_help="Run shard K of N (K/N). Overridden by LLEM_SHARD and --llem-shard.",
    ),
    _row(
        "shuffle",
        "Shuffle the cases within each model-load group (seeded; the seed is recorded).",
        parse_seed,
        form="optional",
        const="random",
        metavar="SEED",
        ini=False,
    ),
    _row(
        "save",
        "Save the run record in the storage folder (optionally under NAME).",
        parse_text,
        form="optional",
        const="",
        metavar="NAME",
        ini=False,
    ),
    _row("autosave", "Save every run.", parse_text, form="flag", ini=False),
    _row(
        "storage",
        "Folder of saved runs (default: .llem).",
        parse_path,
        default=Path(DEFAULT_STORAGE),
        metavar="DIR",
        ini_help="Folder of saved runs (default: .llem).",
    ),
    _row(
        "compare",
        "Compare with a saved run (default: the latest saved on this machine), or with "
        "history[:K[:NAME]]: the last K (default 5) saved runs of this machine named NAME "
        "(default: the --llem-save name, else the newest run's).",
        parse_text,
        form="optional",
        const="latest",
        metavar="NAME|PATH|latest|history[:K[:NAME]]",
        ini=False,
    ),
    _row(
        "fail_on",
        "Fail when a metric regressed beyond a threshold, e.g. "
        "'energy_per_output_token_j:+5%%,output_tokens_per_s:-5%%,ttft_ms.p99:+10%%'.",
        parse_fail_on,
        metavar="EXPR",
        ini=False,
    ),
    _row(
        "fail_inconclusive",
        "Also fail when a comparison's interval straddles a threshold.",
        parse_text,
        form="flag",
        ini=False,
    ),
    _row(
        "calibrate",
        "Run each case N times (default 5), each run with its warmup, and report per gated "
        "metric the between-run spread, the A/A false-alarm rate of --llem-fail-on (or the "
        "default gate), the regression caught with 80%% power and a recommended --llem-fail-on.",
        parse_runs,
        form="optional",
        const="5",
        metavar="N",
        ini=False,
    ),
    _row(
        "gate_estimated",
        "Let estimated energy figures gate too (they do not by default).",
        parse_text,
        form="flag",
        ini=False,
    ),
    _row(
        "compare_strict",
        "Refuse to compare runs from different GPUs, drivers or engine versions.",
        parse_text,
        form="flag",
        ini=False,
    ),
    _row(
        "drift_margin",
        MARGIN_HELP,
        parse_drift_margin,
        metavar="MARGIN",
        ini_help="How far the machine's state may differ before a breach is inconclusive "
        "(default: cpu=0.5,gpu_clock=10%).",
    ),
    _row(
        "csv",
        "Also write one CSV row per case (default: <report-dir>/llem-report.csv).",
        parse_text,
        form="optional",
        const="",
        metavar="PATH",
        ini=False,
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}


def option(name: str) -> Option[Any]:
    """The table's row for option ``name`` (``cooldown``, ``report_dir``...)."""
    return _BY_NAME[name]


def add_options(parser: pytest.Parser) -> None:
    """Register every row: its flag in the ``llem`` group and, where it has one, its ini key."""
    group = parser.getgroup("llem", "LLM inference energy benchmarks (pytest-llem)")
    for row in OPTIONS:
        if row.form == "flag":
            group.addoption(row.flag, dest=row.dest, action="store_true", help=row.help)
        elif row.form == "lines":
            group.addoption(
                row.flag,
                dest=row.dest,
                action="append",
                default=[],
                type=row.parse_argument,
                metavar=row.metavar,
                help=row.help,
            )
        else:
            extra = {"nargs": "?", "const": row.const} if row.form == "optional" else {}
            group.addoption(
                row.flag,
                dest=row.dest,
                default=None,
                type=row.parse_argument,
                metavar=row.metavar,
                help=row.help,
                **extra,
            )
        if row.ini_key is None:
            continue
        if row.form == "lines":
            parser.addini(row.ini_key, row.ini_help or row.help, type="linelist", default=[])
        else:
            help_text = row.ini_help or f"{row.help} Overridden by {row.flag}."
            parser.addini(row.ini_key, help_text, default="")
