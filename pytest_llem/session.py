"""Session state of a pytest-llem run: the resolved options, the backend cache and the meters.

Built once in ``pytest_configure`` and kept in ``config.stash``; the ``llem`` fixture reads it,
the session-finish hook turns the recorded cases into the run record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pytest_llem.backends.base import Backend, BackendInfo, load_key
from pytest_llem.config.models import BUILTIN_BACKENDS, CaseConfig
from pytest_llem.config.resolve import check_value, parse_assignment, set_path
from pytest_llem.exceptions import (
    ConfigurationError,
    EnergyMeterError,
    LlemError,
    MeterUnavailableError,
    ResultStoreError,
)
from pytest_llem.meters.base import EnergyMeter, MeterInfo
from pytest_llem.meters.registry import METER_CHOICES, DomainAssignment, assign_domains
from pytest_llem.results.models import (
    BaselineRecord,
    CaseRecord,
    LoadRecord,
    MeterRecord,
    RunRecord,
)

__all__ = [
    "DEFAULT_REPORT_DIR",
    "METER_NAMES",
    "OPTION_PATHS",
    "BackendCache",
    "CompareBaseline",
    "CooldownSpec",
    "EnergyOptions",
    "LlemOptions",
    "LlemSession",
    "MeterState",
    "StoreOptions",
    "build_options",
    "load_compare_baseline",
    "meter_record",
    "option_origin",
]

logger = logging.getLogger("pytest_llem")

DEFAULT_REPORT_DIR = "reports"
METER_NAMES: tuple[str, ...] = METER_CHOICES

#: Dedicated options (``--llem-NAME`` and ini ``llem_NAME``) that set a case parameter.
OPTION_PATHS = {
    "backend": "backend",
    "model": "model",
    "device": "device",
    "repeat": "repeat",
    "warmup": "warmup",
    "endpoint": "endpoint.url",
}


@dataclass(frozen=True)
class CompareBaseline:
    """The saved run ``--llem-compare`` names, found and read before any case runs."""

    path: Path
    record: RunRecord


@dataclass(frozen=True)
class StoreOptions:
    """Saving, comparing and gating runs (``--llem-save``, ``--llem-compare``, ...).

    ``compare_baseline`` is the run ``compare`` names, once :func:`load_compare_baseline` has
    read it at start-up.
    """

    storage: Path
    save: bool = False
    save_name: str | None = None
    compare: str | None = None
    rules: tuple[Any, ...] = ()
    fail_inconclusive: bool = False
    gate_estimated: bool = False
    strict: bool = False
    csv: Path | None = None
    compare_baseline: CompareBaseline | None = None


def _refuse_report_path(csv_path: Path, report_dir: Path) -> None:
    """``--llem-csv`` must not name the run record or the HTML page the run writes."""
    from pytest_llem.results.store import REPORT_FILENAME, same_file

    for what, written in (
        ("run record", report_dir / REPORT_FILENAME),
        ("HTML report", report_dir / "llem-report.html"),
    ):
        if same_file(csv_path, written):
            raise ConfigurationError(
                f"--llem-csv: {csv_path} is where the run writes its {what}; "
                "refusing to overwrite it, give another path"
            )


def _store_options(
    cli: dict[str, Any], ini: dict[str, Any], invocation_dir: Path, report_dir: Path
) -> StoreOptions:
    from pytest_llem.exceptions import GateError

    storage = Path(cli.get("storage") or ini.get("storage") or ".llem")
    if not storage.is_absolute():
        storage = invocation_dir / storage
    rules: tuple[Any, ...] = ()
    if cli.get("fail_on"):
        if not cli.get("compare"):
            raise ConfigurationError("--llem-fail-on needs a baseline: add --llem-compare[=NAME]")
        from pytest_llem.results.gate import parse_fail_on

        try:
            rules = tuple(parse_fail_on(str(cli["fail_on"])))
        except GateError as e:
            raise ConfigurationError(f"--llem-fail-on: {e}") from e
    csv = cli.get("csv")
    csv_path = None
    if csv is not None:
        csv_path = Path(csv) if csv else report_dir / "llem-report.csv"
        if not csv_path.is_absolute():
            csv_path = invocation_dir / csv_path
        _refuse_report_path(csv_path, report_dir)
    save = cli.get("save")
    return StoreOptions(
        storage=storage,
        save=save is not None or bool(cli.get("autosave")),
        save_name=save or None,
        compare=cli.get("compare"),
        rules=rules,
        fail_inconclusive=bool(cli.get("fail_inconclusive")),
        gate_estimated=bool(cli.get("gate_estimated")),
        strict=bool(cli.get("compare_strict")),
        csv=csv_path,
    )


#: The longest any seconds option may be (a week).
MAX_SECONDS = 7 * 24 * 3600.0
#: Default length of the idle baseline, seconds (``--llem-baseline-s``).
DEFAULT_BASELINE_S = 5.0
#: Default shortest measurement window, seconds (``--llem-min-window-s``): none of its own, so
#: the meters' resolution (20 update periods) alone decides how long a window must last.
DEFAULT_MIN_WINDOW_S = 0.0


@dataclass(frozen=True)
class CooldownSpec:
    """``--llem-cooldown``: ``off``, ``temperature`` or ``seconds:N``."""

    mode: str = "off"
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str | None, option: str = "--llem-cooldown") -> CooldownSpec:
        """Parse the option's value; raises ConfigurationError naming ``option`` (the flag or
        the ini key it came from) and the accepted forms."""
        raw = (text or "off").strip().lower()
        if raw in ("off", "temperature"):
            return cls(raw)
        if raw.startswith("seconds:"):
            with contextlib.suppress(ConfigurationError):
                seconds = _seconds(raw.split(":", 1)[1], option, default=-1.0)
                if seconds >= 0:
                    return cls("seconds", seconds)
        raise ConfigurationError(
            f"{option}: expected off, temperature or seconds:N "
            f"(0 <= N <= {MAX_SECONDS:g}), got {text!r}"
        )


@dataclass(frozen=True)
class EnergyOptions:
    """How energy is measured: baseline, short windows, cooldown, CodeCarbon's country.

    ``baseline_forced`` is True when ``--llem-baseline-s`` was given on the command line: the
    baseline is then measured afresh instead of reused from the cache.
    """

    baseline_s: float = DEFAULT_BASELINE_S
    baseline_forced: bool = False
    min_window_s: float = DEFAULT_MIN_WINDOW_S
    cooldown: CooldownSpec = field(default_factory=CooldownSpec)
    country_iso_code: str | None = None


def option_origin(cli: dict[str, Any], ini: dict[str, Any], name: str) -> tuple[Any, str]:
    """The raw value of option ``name`` and how a message names where it came from.

    Returns:
        The command line's value and ``--llem-NAME`` when one was given there, else the ini
        file's and ``ini option llem_NAME``, else None and ``the default of --llem-NAME``.
    """
    flag = f"--llem-{name.replace('_', '-')}"
    for raw, origin in ((cli.get(name), flag), (ini.get(name), f"ini option llem_{name}")):
        if raw is not None and str(raw).strip() != "":
            return raw, origin
    return None, f"the default of {flag}"


def _seconds(raw: Any, option: str, default: float) -> float:
    """A seconds option: a finite number from 0 to :data:`MAX_SECONDS`.

    Infinity would overflow the timers a timeout arms and ``sleep``; beyond a week a value is
    a typo (milliseconds given as seconds, say), not a measurement plan.
    """
    if raw is None or str(raw).strip() == "":
        return default
    expected = f"{option}: expected seconds, 0 <= N <= {MAX_SECONDS:g} (7 days), got {raw!r}"
    try:
        value = float(str(raw).strip())
    except ValueError as e:
        raise ConfigurationError(expected) from e
    if not (0 <= value <= MAX_SECONDS):  # also false for nan
        raise ConfigurationError(expected)
    return value


def _energy_options(cli: dict[str, Any], ini: dict[str, Any]) -> EnergyOptions:
    baseline_raw, baseline_origin = option_origin(cli, ini, "baseline_s")
    baseline = _seconds(baseline_raw, baseline_origin, DEFAULT_BASELINE_S)
    min_window = _seconds(*option_origin(cli, ini, "min_window_s"), DEFAULT_MIN_WINDOW_S)
    country_raw, country_origin = option_origin(cli, ini, "country")
    country = str(country_raw or "").strip().upper() or None
    if country is not None and not (len(country) == 3 and country.isalpha()):
        raise ConfigurationError(
            f"{country_origin}: expected a three-letter ISO code such as USA or FRA, "
            f"got {country!r}"
        )
    cooldown_raw, cooldown_origin = option_origin(cli, ini, "cooldown")
    return EnergyOptions(
        baseline_s=baseline,
        baseline_forced=baseline_origin.startswith("--"),
        min_window_s=min_window,
        cooldown=CooldownSpec.parse(cooldown_raw, cooldown_origin),
        country_iso_code=country,
    )


@dataclass(frozen=True)
class LlemOptions:
    """The plugin's options after validation. Layers are nested dicts of case parameters."""

    cli_layer: dict[str, Any]
    ini_layer: dict[str, Any]
    meter: str
    report_dir: Path
    backend_names: tuple[str, ...] = BUILTIN_BACKENDS
    meter_names: tuple[str, ...] = METER_NAMES
    ini_sweep_axes: dict[str, list[Any]] = field(default_factory=dict)
    cli_sweep_axes: dict[str, list[Any]] = field(default_factory=dict)
    shuffle_seed: int | None = None
    store: StoreOptions | None = None
    given: dict[str, Any] = field(default_factory=dict)
    energy: EnergyOptions = field(default_factory=EnergyOptions)
    gpu_groups: tuple[tuple[int, ...], ...] | None = None
    isolation: str = "warn"
    timeout_s: float | None = None

    @property
    def sweep_axes(self) -> dict[str, list[Any]]:
        """The ini and command-line sweep axes together (the command line replaces an axis)."""
        return {**self.ini_sweep_axes, **self.cli_sweep_axes}


def _layer(
    *,
    named: dict[str, str | None],
    assignments: Sequence[str],
    origin: Callable[[str], str],
    backend_names: Sequence[str],
) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for text in assignments:
        try:
            path, value = parse_assignment(text)
            checked = check_value(path, value)
            # Groups (sampling, transformers) stay plain dicts so layers merge key by key.
            set_path(layer, path, value if isinstance(checked, BaseModel) else checked)
        except ConfigurationError as e:
            raise ConfigurationError(f"{origin('set')} {text}: {e}") from e
    for name, raw in named.items():
        if raw is None or str(raw).strip() == "":
            continue
        path = OPTION_PATHS[name]
        text_value = str(raw).strip()
        if path == "backend" and text_value not in backend_names:
            raise ConfigurationError(
                f"{origin(name)}: unknown backend {text_value!r}; "
                f"choose from: {', '.join(backend_names)}"
            )
        try:
            set_path(layer, path, check_value(path, text_value))
        except ConfigurationError as e:
            raise ConfigurationError(f"{origin(name)}: {e}") from e
    return layer


def build_options(
    *,
    cli: dict[str, Any],
    ini: dict[str, Any],
    invocation_dir: Path,
    backend_names: Sequence[str] = BUILTIN_BACKENDS,
    meter_names: Sequence[str] = METER_NAMES,
) -> LlemOptions:
    """Validate the plugin's options from the command line (``cli``) and ini keys (``ini``).

    Both dicts map option names (``backend``, ``model``, ``device``, ``repeat``, ``warmup``,
    ``meter``, ``report_dir``, ``set``) to raw values; None or "" means not given. An
    ``endpoint`` URL given where no backend is chosen selects the ``endpoint`` backend.

    Raises:
        ConfigurationError: naming the option, the problem and, for choices, the allowed values.
    """
    cli = dict(cli)
    ini_axes, cli_axes = _sweep_axes(cli, ini, backend_names)
    axes = {**ini_axes, **cli_axes}
    if "backend" in axes:
        cli["backend"] = None  # several engines: a sweep axis, not one setting
    cli_layer = _layer(
        named={k: cli.get(k) for k in OPTION_PATHS},
        assignments=cli.get("set") or [],
        origin=lambda n: f"--llem-{n.replace('_', '-')}",
        backend_names=backend_names,
    )
    ini_layer = _layer(
        named={k: ini.get(k) for k in OPTION_PATHS},
        assignments=ini.get("set") or [],
        origin=lambda n: f"ini option llem_{n}",
        backend_names=backend_names,
    )
    if "backend" not in axes:
        _endpoint_selects_backend(cli_layer, backend_names)
        _endpoint_selects_backend(ini_layer, backend_names)
    _check_one_source(cli_layer, cli_axes, cli, origin=lambda n: f"--llem-{n.replace('_', '-')}")
    _check_one_source(ini_layer, ini_axes, ini, origin=lambda n: f"llem_{n}", ini=True)
    from pytest_llem.meters.registry import parse_meter_list

    meter_raw, meter_origin = option_origin(cli, ini, "meter")
    try:
        meter = ",".join(parse_meter_list(str(meter_raw or "auto"), meter_names))
    except ConfigurationError as e:
        raise ConfigurationError(f"{meter_origin}: {e}") from e
    energy = _energy_options(cli, ini)
    from pytest_llem.harness.isolation import ISOLATION_MODES
    from pytest_llem.workers import parse_gpu_groups

    gpus_raw, gpus_origin = option_origin(cli, ini, "gpus")
    gpu_groups = parse_gpu_groups(gpus_raw, option=gpus_origin)
    isolation_raw, isolation_origin = option_origin(cli, ini, "isolation")
    isolation = str(isolation_raw or "warn").strip().lower()
    if isolation not in ISOLATION_MODES:
        raise ConfigurationError(
            f"{isolation_origin}: expected one of {', '.join(ISOLATION_MODES)}, got {isolation!r}"
        )
    timeout_s = _seconds(*option_origin(cli, ini, "timeout_s"), 0.0)
    report_dir = Path(cli.get("report_dir") or ini.get("report_dir") or DEFAULT_REPORT_DIR)
    if not report_dir.is_absolute():
        report_dir = invocation_dir / report_dir
    shuffle_seed = _shuffle_seed(cli.get("shuffle"))
    store = _store_options(cli, ini, invocation_dir, report_dir)
    given = {
        "command_line": {k: v for k, v in cli.items() if v not in (None, "", [], False)},
        "ini": {k: v for k, v in ini.items() if v not in (None, "", [], False)},
        "meter": meter,
        "report_dir": str(report_dir),
        "sweep": axes,
        "shuffle_seed": shuffle_seed,
        "baseline_s": energy.baseline_s,
        "min_window_s": energy.min_window_s,
        "cooldown": energy.cooldown.mode
        + (f":{energy.cooldown.seconds:g}" if energy.cooldown.mode == "seconds" else ""),
        "isolation": isolation,
    }
    return LlemOptions(
        cli_layer=cli_layer,
        ini_layer=ini_layer,
        meter=meter,
        report_dir=report_dir,
        backend_names=tuple(backend_names),
        meter_names=tuple(meter_names),
        ini_sweep_axes=ini_axes,
        cli_sweep_axes=cli_axes,
        shuffle_seed=shuffle_seed,
        store=store,
        given=given,
        energy=energy,
        gpu_groups=gpu_groups,
        isolation=isolation,
        timeout_s=timeout_s or None,
    )


def load_compare_baseline(options: LlemOptions, machine: str) -> LlemOptions:
    """Find and read the run ``--llem-compare`` names, so a baseline that cannot be loaded
    stops the session before any case runs.

    Args:
        options: The validated options; returned unchanged without ``--llem-compare``.
        machine: :func:`~pytest_llem.results.storage.machine_id` of this machine, as the run
            record will have it (a name or ``latest`` is looked up among its saved runs).

    Returns:
        The options with :attr:`StoreOptions.compare_baseline` set.

    Raises:
        ConfigurationError: no such saved run or file, or one that cannot be read or is not a
            run record of a supported schema; the message names what was looked for and where
            (the storage folder, the machine and the runs saved there).
    """
    store = options.store
    if store is None or store.compare is None:
        return options
    from pytest_llem.results.storage import resolve_baseline
    from pytest_llem.results.store import read_run_record

    try:
        path = resolve_baseline(store.compare, store.storage, machine)
        record = read_run_record(path)
    except (ResultStoreError, OSError) as e:
        # one line: a usage error is read in a CI log, a validation error spans several
        detail = " ".join(str(e).split())
        raise ConfigurationError(f"--llem-compare={store.compare}: {detail}") from e
    loaded = dataclasses.replace(store, compare_baseline=CompareBaseline(path, record))
    return dataclasses.replace(options, store=loaded)


def _endpoint_selects_backend(layer: dict[str, Any], backend_names: Sequence[str]) -> None:
    """An endpoint URL given where no backend is chosen makes that layer choose ``endpoint``."""
    if "backend" in layer or "endpoint" not in backend_names:
        return
    if (layer.get("endpoint") or {}).get("url"):
        layer["backend"] = "endpoint"


def _axes_from(origin: str, lines: Sequence[str] | None) -> list[dict[str, Any]]:
    from pytest_llem.sweep import merge_axes, parse_sweep_option

    layers: list[dict[str, Any]] = []
    for text in lines or []:
        try:
            key, values = parse_sweep_option(text)
            layers.append(merge_axes([{key: values}]))
        except ConfigurationError as e:
            raise ConfigurationError(f"{origin} {text}: {e}") from e
    return layers


def _sweep_axes(
    cli: dict[str, Any], ini: dict[str, Any], backend_names: Sequence[str]
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Sweep axes of the ini file (``llem_sweep`` lines) and of the command line
    (``--llem-sweep``, then a comma-separated ``--llem-backend``), kept apart because each
    takes the precedence of its source."""
    from pytest_llem.sweep import merge_axes

    ini_axes = merge_axes(_axes_from("ini option llem_sweep", ini.get("sweep")))
    layers = _axes_from("--llem-sweep", cli.get("sweep"))
    engines = str(cli.get("backend") or "")
    if "," in engines:
        layers.append({"backend": [name.strip() for name in engines.split(",") if name.strip()]})
    cli_axes = merge_axes(layers)
    for axes in (ini_axes, cli_axes):
        unknown = [name for name in axes.get("backend", []) if name not in backend_names]
        if unknown:
            raise ConfigurationError(
                f"--llem-backend: unknown backend {unknown[0]!r}; "
                f"choose from: {', '.join(backend_names)}"
            )
    return ini_axes, cli_axes


def _check_one_source(
    layer: dict[str, Any],
    axes: dict[str, list[Any]],
    raw: dict[str, Any],
    *,
    origin: Callable[[str], str],
    ini: bool = False,
) -> None:
    """One source may set a parameter or sweep it, not both: which should win is not said.

    Raises:
        ConfigurationError: naming both options and the parameter.
    """
    from pytest_llem.config.resolve import lookup_path

    for path in axes:
        found, value = lookup_path(layer, path)
        if not found or isinstance(value, dict):
            continue
        named = [name for name, at in OPTION_PATHS.items() if at == path and raw.get(name)]
        setter = origin(named[0] if named else "set")
        sweeper = origin("sweep")
        both = f"ini options {setter} and {sweeper}" if ini else f"{setter} and {sweeper}"
        raise ConfigurationError(f"{both} both set {path}; give one of them")


def _shuffle_seed(raw: Any) -> int | None:
    """``--llem-shuffle`` (a fresh seed, recorded) or ``--llem-shuffle=SEED``."""
    if raw is None or raw is False:
        return None
    if raw is True or str(raw).strip() in ("", "random"):
        return random.SystemRandom().randrange(2**32)
    try:
        seed = int(str(raw).strip())
    except ValueError as e:
        raise ConfigurationError(f"--llem-shuffle: expected an integer seed, got {raw!r}") from e
    if seed < 0:
        raise ConfigurationError(f"--llem-shuffle: the seed must be >= 0, got {seed}")
    return seed


class BackendCache:
    """Keeps one loaded backend and hands it to every case with the same load configuration.

    A case with another load configuration closes the resident backend first, so only one model
    is in memory at a time. Load time is spent here, never inside a measured window.
    """

    def __init__(self, make: Callable[[CaseConfig], Backend]) -> None:
        self._make = make
        self._key: object = None
        self._backend: Backend | None = None
        self._info: BackendInfo | None = None

    def get(self, case: CaseConfig) -> tuple[Backend, BackendInfo, LoadRecord]:
        """The backend for ``case``, loading it unless the resident one fits."""
        key = load_key(case)
        if self._backend is not None and self._info is not None and key == self._key:
            return self._backend, self._info, LoadRecord(reused=True, seconds=0.0)
        self.close()
        backend = self._make(case)
        started = time.perf_counter()
        try:
            info = backend.load()
        except BaseException:
            _close_quietly(backend)
            raise
        seconds = time.perf_counter() - started
        self._key, self._backend, self._info = key, backend, info
        return backend, info, LoadRecord(reused=False, seconds=seconds)

    def close(self) -> None:
        """Release the resident backend, if any."""
        if self._backend is not None:
            _close_quietly(self._backend)
        self._key, self._backend, self._info = None, None, None


def _close_quietly(closable: Backend | EnergyMeter) -> None:
    try:
        closable.close()
    except Exception:  # a failing close must not hide the error that led here
        logger.warning("closing %s failed", getattr(closable, "name", closable), exc_info=True)


def meter_record(info: MeterInfo) -> MeterRecord:
    """A meter's description as written into the run record."""
    return MeterRecord(
        name=info.name,
        domains=list(info.domains),
        sources=dict(info.sources),
        update_period_s=info.resolution.update_period_s,
        update_period_measured=info.resolution.update_period_measured,
        resolution_note=info.resolution.note,
        energy_quantum_j=info.resolution.energy_quantum_j,
        used_for=list(info.domains),
        devices=list(info.devices),
        selected_because=info.selected_because,
        details=dict(info.details),
    )


class MeterState:
    """The session's meters, created on first use so collection alone never touches hardware.

    ``requested`` is ``auto``, ``none`` or one or more meter names joined with commas. Each
    domain is taken from one meter only (:func:`~pytest_llem.meters.registry.assign_domains`).
    With ``auto`` a meter that fails to start is dropped (``none`` when none is left) and the
    record says why; a meter the user named that cannot measure here makes every case skip with
    the reason.
    """

    def __init__(
        self,
        requested: str,
        *,
        make: Callable[[str], EnergyMeter],
        select_auto: Callable[[], tuple[str, str]],
    ) -> None:
        self.requested = requested
        self._make = make
        self._select_auto = select_auto
        self._meters: list[EnergyMeter] | None = None
        self._records: list[MeterRecord] = []
        self._unavailable: MeterUnavailableError | None = None
        self.assignment = DomainAssignment()

    def get(self) -> tuple[list[EnergyMeter], list[MeterRecord]]:
        """The meters and their records. Raises MeterUnavailableError for a named meter that
        cannot measure on this machine."""
        if self._unavailable is not None:
            raise self._unavailable
        if self._meters is None:
            self._meters, why = self._create()
            infos = [meter.info() for meter in self._meters]
            self.assignment = assign_domains(infos)
            self._records = []
            for info in infos:
                record = meter_record(info)
                record.selected_because = why
                record.used_for = self.assignment.used_for(info.name)
                record.notes = [n for n in self.assignment.notes if f"{info.name}'s " in n]
                self._records.append(record)
        return self._meters, self._records

    def _create_named(self, names: Sequence[str]) -> list[EnergyMeter]:
        meters: list[EnergyMeter] = []
        try:
            for name in names:
                meters.append(self._make(name))
        except BaseException:
            for meter in meters:
                _close_quietly(meter)
            raise
        return meters

    def _create(self) -> tuple[list[EnergyMeter], str]:
        if self.requested != "auto":
            try:
                meters = self._create_named(self.requested.split(","))
            except MeterUnavailableError as e:
                self._unavailable = e
                raise
            return meters, f"requested with --llem-meter={self.requested}"
        names, why = self._select_auto()
        meters = []
        for name in names.split(","):
            try:
                meters.append(self._make(name))
            except MeterUnavailableError as e:
                logger.warning("meter %s could not start (%s)", name, e.reason)
                why = f"{why}; but {name} failed to start: {e.reason}"
        if not meters:
            return [self._make("none")], f"auto: {why}"
        return meters, f"auto: {why}"

    def close(self) -> None:
        """Release every meter."""
        for meter in self._meters or []:
            _close_quietly(meter)
        self._meters = None


class BaselineState:
    """The session's idle baseline: measured (or taken from the cache) before the first case.

    ``record`` is None when ``--llem-baseline-s=0``, when no meter covers a domain, or when
    measuring failed; ``problem`` then says why, and every case without a baseline carries it.
    A measurement that was interrupted (Ctrl-C, ``--llem-timeout-s``) is noted and re-raised,
    and the next case measures it again (once: a second interruption leaves the session
    without it, saying so).
    """

    #: Tries at an interrupted baseline before the session goes without one.
    ATTEMPTS = 2

    def __init__(
        self,
        options: EnergyOptions,
        progress: Callable[[str], None],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options
        self._progress = progress
        self._sleep = sleep
        self._done = False
        self._interrupted = 0
        self.record: BaselineRecord | None = None
        self.problem: str | None = None

    def get(
        self,
        meters: Sequence[EnergyMeter],
        records: Sequence[MeterRecord],
        assignment: DomainAssignment,
    ) -> BaselineRecord | None:
        """The baseline, measuring it on the first call (again after an interruption).

        Raises:
            BaseException: Whatever interrupted the measurement (after noting it).
        """
        if self._done:
            return self.record
        if self.options.baseline_s <= 0 or not assignment.meters:
            self._done = True
            self.problem = (
                "idle baseline disabled (--llem-baseline-s=0)"
                if self.options.baseline_s <= 0
                else "no energy meter: no idle baseline"
            )
            return None
        from pytest_llem.harness.baseline import (
            baseline_cache_key,
            baseline_cache_path,
            load_cached_baseline,
            store_baseline,
        )

        key = baseline_cache_key(records)
        path = baseline_cache_path(key)
        cached = None if self.options.baseline_forced else load_cached_baseline(path)
        record = cached if cached is not None else self._measure(meters, records, assignment)
        self._done = True
        if record is None:
            return None
        self.problem = None
        self.record = record if cached is not None else record.model_copy(update={"cache_key": key})
        if cached is None:
            store_baseline(path, self.record)
        return self.record

    def _measure(
        self,
        meters: Sequence[EnergyMeter],
        records: Sequence[MeterRecord],
        assignment: DomainAssignment,
    ) -> BaselineRecord | None:
        """Measure idle power; None (with ``problem`` set) when a meter failed."""
        from pytest_llem.harness.baseline import measure_baseline
        from pytest_llem.harness.runner import WindowPolicy

        floor = WindowPolicy.for_meters(
            min_window_s=0.0, update_periods=[r.update_period_s for r in records if r.used_for]
        ).floor_s
        seconds = self.options.baseline_s
        self._progress(
            f"measuring idle power for {max(seconds, floor):g} s or more (baseline; cached "
            "for an hour; --llem-baseline-s=0 skips it)"
        )
        try:
            return measure_baseline(
                meters,
                seconds=seconds,
                assignment=assignment.meters,
                sleep=self._sleep,
                floor_s=floor,
            )
        except EnergyMeterError as e:
            self.problem = f"the idle baseline could not be measured: {e}"
            logger.warning("llem: %s", self.problem)
            return None
        except BaseException as e:
            self._interrupted += 1
            last = self._interrupted >= self.ATTEMPTS
            then = (
                "no dynamic energy in this session" if last else "the next case measures it again"
            )
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            self.problem = f"the idle baseline was interrupted ({what}); {then}"
            self._done = last
            logger.warning("llem: %s", self.problem)
            raise


@dataclass
class LlemSession:
    """Everything the plugin keeps for one pytest session."""

    options: LlemOptions
    backends: BackendCache
    meters: MeterState
    progress: Callable[[str], None]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    cases: list[CaseRecord] = field(default_factory=list)
    record: RunRecord | None = None
    finish: Any = None
    journal: Any = None
    llem_items: set[str] = field(default_factory=set)
    store_error: str | None = None
    journal_error: str | None = None
    baseline: BaselineState | None = None

    def close(self) -> None:
        """Release the backend and the meters."""
        self.backends.close()
        self.meters.close()


def describe_error(error: BaseException) -> str:
    """``Type: message`` for a failure line."""
    kind = type(error).__name__ if isinstance(error, LlemError) else f"{type(error).__name__}"
    return f"{kind}: {error}"
