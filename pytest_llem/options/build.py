"""From the parsed option values to the frozen :class:`~pytest_llem.options.model.LlemOptions`:
the checks that need several options, or the names plugins provide, and the ``--llem-compare``
baseline read at start-up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.config.meter_names import METER_CHOICES, parse_meter_list
from pytest_llem.config.models import BUILTIN_BACKENDS
from pytest_llem.config.resolve import check_value, lookup_path, set_path
from pytest_llem.exceptions import ConfigurationError, ResultStoreError
from pytest_llem.options.model import CompareBaseline, EnergyOptions, LlemOptions, StoreOptions
from pytest_llem.options.parsers import Assignment, SweepAxis
from pytest_llem.options.profile import choose_profile
from pytest_llem.options.table import OPTIONS, option
from pytest_llem.options.values import OptionValues
from pytest_llem.results.adaptive import DEFAULT_MAX_REPEAT, DEFAULT_TARGET_CI, AdaptivePlan
from pytest_llem.results.drift import DEFAULT_DRIFT_MARGIN

__all__ = [
    "OPTION_PATHS",
    "build_options",
    "load_compare_baseline",
    "options_from_config",
    "options_from_values",
]

#: Dedicated options (``--llem-NAME`` and ini ``llem_NAME``) that set a case parameter.
OPTION_PATHS = {
    "backend": "backend",
    "model": "model",
    "device": "device",
    "repeat": "repeat",
    "warmup": "warmup",
    "endpoint": "endpoint.url",
}


def build_options(
    *,
    cli: Mapping[str, Any],
    ini: Mapping[str, Any],
    invocation_dir: Path,
    environ: Mapping[str, str] | None = None,
    backend_names: Sequence[str] = BUILTIN_BACKENDS,
    meter_names: Sequence[str] = METER_CHOICES,
) -> LlemOptions:
    """The options from values as a user writes them, by option name (``cli``: the command
    line's, ``ini``: the ini file's; a string, a list of lines for ``set``/``sweep``, a bool for
    a flag). For tests and programs; the plugin reads pytest's config
    (:func:`options_from_config`).

    Raises:
        ConfigurationError: naming the option or ini key, the problem and the allowed values.
    """
    return options_from_values(
        OptionValues.from_text(cli, ini, environ),
        invocation_dir=invocation_dir,
        backend_names=backend_names,
        meter_names=meter_names,
    )


def options_from_config(
    config: pytest.Config, *, backend_names: Sequence[str], meter_names: Sequence[str]
) -> LlemOptions:
    """The options of this pytest run: its command line and its ini file.

    Raises:
        ConfigurationError: naming the option or ini key, the problem and the allowed values.
    """
    return options_from_values(
        OptionValues.from_config(config),
        invocation_dir=config.invocation_params.dir,
        backend_names=backend_names,
        meter_names=meter_names,
    )


def options_from_values(
    values: OptionValues,
    *,
    invocation_dir: Path,
    backend_names: Sequence[str] = BUILTIN_BACKENDS,
    meter_names: Sequence[str] = METER_CHOICES,
) -> LlemOptions:
    """Check what needs several options or the plugins' names, and build the model.

    An ``endpoint`` URL given where no backend is chosen selects the ``endpoint`` backend.

    Raises:
        ConfigurationError: naming the option, the problem and, for choices, the allowed values.
    """
    ini_axes, cli_axes = _sweep_axes(values, backend_names)
    axes = {**ini_axes, **cli_axes}
    # several engines, or an engine axis anywhere: a sweep axis, not one setting
    cli_backend = "backend" not in axes
    cli_layer = _layer(values, ini=False, backend_names=backend_names, backend=cli_backend)
    ini_layer = _layer(values, ini=True, backend_names=backend_names, backend=True)
    if "backend" not in axes:
        _endpoint_selects_backend(cli_layer, backend_names)
        _endpoint_selects_backend(ini_layer, backend_names)
    _check_one_source(cli_layer, cli_axes, values, ini=False, backend=cli_backend)
    _check_one_source(ini_layer, ini_axes, values, ini=True, backend=True)
    meter = _meter(values, meter_names)
    energy = _energy(values)
    report_dir = _absolute(values.get(option("report_dir")), invocation_dir)
    asked = values.chosen(option("profile"))
    return LlemOptions(
        cli_layer=cli_layer,
        ini_layer=ini_layer,
        meter=meter,
        report_dir=report_dir,
        backend_names=tuple(backend_names),
        meter_names=tuple(meter_names),
        ini_sweep_axes=ini_axes,
        cli_sweep_axes=cli_axes,
        shuffle_seed=values.cli(option("shuffle")),
        store=_store(values, invocation_dir, report_dir),
        given=_given(values, meter, report_dir, axes, energy),
        energy=energy,
        gpu_groups=values.get(option("gpus")),
        isolation=values.get(option("isolation")),
        timeout_s=values.get(option("timeout_s")) or None,
        shard=values.get(option("shard")),
        origins={row.name: values.chosen(row).origin for row in OPTIONS},
        adaptive=_adaptive(values),
        profile=choose_profile(asked.value, asked.origin, layers=(cli_layer, ini_layer)),
    )


def _given(
    values: OptionValues,
    meter: str,
    report_dir: Path,
    axes: dict[str, Any],
    energy: EnergyOptions,
) -> dict[str, Any]:
    """What the run record's ``options`` section shows of the options the run was given."""
    given: dict[str, Any] = {
        "command_line": values.shown(),
        "ini": values.shown(ini=True),
        "meter": meter,
        "report_dir": str(report_dir),
        "sweep": axes,
        "shuffle_seed": values.cli(option("shuffle")),
        "baseline_s": energy.baseline_s,
        "min_window_s": energy.min_window_s,
        "cooldown": str(energy.cooldown),
        "isolation": values.get(option("isolation")),
    }
    shard = values.get(option("shard"))
    if shard is not None:
        given["shard"] = str(shard)
    return given


def _absolute(path: Path | None, invocation_dir: Path) -> Path:
    assert path is not None  # the row has a default
    return path if path.is_absolute() else invocation_dir / path


def _unknown_backend(origin: str, name: str, backend_names: Sequence[str]) -> ConfigurationError:
    return ConfigurationError(
        f"{origin}: unknown backend {name!r}; choose from: {', '.join(backend_names)}"
    )


def _layer(
    values: OptionValues, *, ini: bool, backend_names: Sequence[str], backend: bool
) -> dict[str, Any]:
    """The case parameters one source sets: its ``set`` lines, then its dedicated options."""
    layer: dict[str, Any] = {}
    assignments: tuple[Assignment, ...] = values.lines(option("set"), ini=ini)
    for assignment in assignments:
        set_path(layer, assignment.path, assignment.value)
    for name, path in OPTION_PATHS.items():
        row = option(name)
        value = values.ini(row) if ini else values.cli(row)
        if value is None or (name == "backend" and not backend):
            continue
        if name == "backend":
            origin = row.ini_origin if ini else row.flag
            text = ",".join(value)
            if len(value) > 1 and not ini:
                continue  # several engines on the command line: a sweep axis
            if text not in backend_names:
                raise _unknown_backend(origin, text, backend_names)
            value = check_value(path, text)
        set_path(layer, path, value)
    return layer


def _endpoint_selects_backend(layer: dict[str, Any], backend_names: Sequence[str]) -> None:
    """An endpoint URL given where no backend is chosen makes that layer choose ``endpoint``."""
    if "backend" in layer or "endpoint" not in backend_names:
        return
    if (layer.get("endpoint") or {}).get("url"):
        layer["backend"] = "endpoint"


def _sweep_axes(
    values: OptionValues, backend_names: Sequence[str]
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Sweep axes of the ini file (``llem_sweep`` lines) and of the command line
    (``--llem-sweep``, then a comma-separated ``--llem-backend``), kept apart because each
    takes the precedence of its source."""
    from pytest_llem.sweep import merge_axes

    def layers(ini: bool) -> list[dict[str, Any]]:
        lines: tuple[SweepAxis, ...] = values.lines(option("sweep"), ini=ini)
        return [{axis.path: list(axis.values)} for axis in lines]

    ini_axes = merge_axes(layers(ini=True))
    cli_layers = layers(ini=False)
    engines = values.cli(option("backend")) or ()
    if len(engines) > 1:
        cli_layers.append({"backend": list(engines)})
    cli_axes = merge_axes(cli_layers)
    for found in (ini_axes, cli_axes):
        unknown = [name for name in found.get("backend", []) if name not in backend_names]
        if unknown:
            raise _unknown_backend("--llem-backend", unknown[0], backend_names)
    return ini_axes, cli_axes


def _check_one_source(
    layer: dict[str, Any],
    axes: dict[str, list[Any]],
    values: OptionValues,
    *,
    ini: bool,
    backend: bool,
) -> None:
    """One source may set a parameter or sweep it, not both: which should win is not said.

    Raises:
        ConfigurationError: naming both options and the parameter.
    """

    def named(name: str) -> str:
        return f"llem_{name}" if ini else option(name).flag

    for path in axes:
        found, value = lookup_path(layer, path)
        if not found or isinstance(value, dict):
            continue
        setters = [
            name
            for name, at in OPTION_PATHS.items()
            if at == path
            and (backend or name != "backend")
            and (values.ini(option(name)) if ini else values.cli(option(name)))
        ]
        setter, sweeper = named(setters[0] if setters else "set"), named("sweep")
        both = f"ini options {setter} and {sweeper}" if ini else f"{setter} and {sweeper}"
        raise ConfigurationError(f"{both} both set {path}; give one of them")


def _meter(values: OptionValues, meter_names: Sequence[str]) -> str:
    chosen = values.chosen(option("meter"))
    try:
        return ",".join(parse_meter_list(",".join(chosen.value or ("auto",)), meter_names))
    except ConfigurationError as e:
        raise ConfigurationError(f"{chosen.origin}: {e}") from e


def _energy(values: OptionValues) -> EnergyOptions:
    baseline = values.chosen(option("baseline_s"))
    return EnergyOptions(
        baseline_s=baseline.value,
        baseline_forced=baseline.from_command_line,
        min_window_s=values.get(option("min_window_s")),
        cooldown=values.get(option("cooldown")),
        country_iso_code=values.get(option("country")),
    )


def _adaptive(values: OptionValues) -> AdaptivePlan:
    """The limits of ``repeat=auto``; ``--llem-max-case-s=0`` means no limit, as for
    ``--llem-timeout-s``."""
    return AdaptivePlan(
        max_repeat=values.get(option("max_repeat")) or DEFAULT_MAX_REPEAT,
        max_case_s=values.get(option("max_case_s")) or None,
        target_ci=values.get(option("target_ci")) or DEFAULT_TARGET_CI,
    )


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


def _store(values: OptionValues, invocation_dir: Path, report_dir: Path) -> StoreOptions:
    compare = values.cli(option("compare"))
    rules = values.cli(option("fail_on")) or ()
    calibrate = values.cli(option("calibrate"))
    if rules and compare is None and calibrate is None:  # calibrating measures the gate itself
        raise ConfigurationError("--llem-fail-on needs a baseline: add --llem-compare[=NAME]")
    csv = values.cli(option("csv"))
    csv_path = None
    if csv is not None:
        csv_path = _absolute(Path(csv) if csv else report_dir / "llem-report.csv", invocation_dir)
        _refuse_report_path(csv_path, report_dir)
    save = values.cli(option("save"))
    return StoreOptions(
        storage=_absolute(values.get(option("storage")), invocation_dir),
        save=save is not None or values.flag(option("autosave")),
        save_name=save or None,
        compare=compare,
        rules=rules,
        fail_inconclusive=values.flag(option("fail_inconclusive")),
        gate_estimated=values.flag(option("gate_estimated")),
        strict=values.flag(option("compare_strict")),
        drift_margin=values.get(option("drift_margin")) or DEFAULT_DRIFT_MARGIN,
        csv=csv_path,
        calibrate=calibrate,
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
    from pytest_llem.results.history import load_history, parse_history
    from pytest_llem.results.storage import resolve_baseline
    from pytest_llem.results.store import read_run_record

    try:
        history = parse_history(store.compare)
        if history is not None:
            baseline = CompareBaseline(
                **load_history(
                    store.storage, machine, runs=history.runs, name=history.name or store.save_name
                )
            )
        else:
            path = resolve_baseline(store.compare, store.storage, machine)
            baseline = CompareBaseline(path=path, record=read_run_record(path))
    except (ResultStoreError, OSError) as e:
        # one line: a usage error is read in a CI log, a validation error spans several
        detail = " ".join(str(e).split())
        raise ConfigurationError(f"--llem-compare={store.compare}: {detail}") from e
    loaded = store.model_copy(update={"compare_baseline": baseline})
    return options.model_copy(update={"store": loaded})
