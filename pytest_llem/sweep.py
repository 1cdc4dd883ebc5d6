"""Sweeps: turning ``@pytest.mark.llem_sweep(...)`` and ``--llem-sweep KEY=V1,V2`` into cases.

Axes are parameter paths with a list of values (or ``"auto"`` for the values introspection
derives from the models). Each value is checked on its own first (a bad one is an error naming
it); then every combination of the cartesian product is resolved as a whole, and one that a
declared constraint rules out becomes a skipped case whose reason names the rule.

Every axis keeps its origin (the marker, the ini file or the command line), because a sweep value
takes its place in the precedence of its source: an ini sweep beats ``llem.run`` overrides, a
marker sweep does not.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_llem.config.introspection import case_id, constraints, parameter
from pytest_llem.config.models import CaseConfig
from pytest_llem.config.resolve import check_value, parse_value, set_path
from pytest_llem.exceptions import ConfigurationError

__all__ = [
    "AUTO",
    "CLI_ORIGIN",
    "INI_ORIGIN",
    "MARKER_ORIGIN",
    "SweepCase",
    "expand",
    "merge_axes",
    "parse_sweep_option",
]

AUTO = "auto"

#: Where an axis comes from, lowest precedence first.
MARKER_ORIGIN = "marker"
INI_ORIGIN = "ini"
CLI_ORIGIN = "command line"


@dataclass(frozen=True)
class SweepCase:
    """One combination of a sweep: its values by parameter path, its test id, why it is
    skipped (None when it runs) and where each axis comes from (``MARKER_ORIGIN``,
    ``INI_ORIGIN`` or ``CLI_ORIGIN``; a path not listed is a marker's)."""

    values: dict[str, Any]
    id: str
    skip_reason: str | None = None
    origins: dict[str, str] = field(default_factory=dict)

    def origin(self, path: str) -> str:
        """Where the axis of ``path`` comes from."""
        return self.origins.get(path, MARKER_ORIGIN)

    def layer(self, origin: str | None = None) -> dict[str, Any]:
        """The combination as a nested settings layer: the values of one origin, or all."""
        tree: dict[str, Any] = {}
        for path, value in self.values.items():
            if origin is None or self.origin(path) == origin:
                set_path(tree, path, value)
        return tree


def parse_sweep_option(text: str) -> tuple[str, list[Any]]:
    """Parse ``KEY=V1,V2`` (or ``KEY=auto``) from ``--llem-sweep``.

    Raises:
        ConfigurationError: no ``=``, an unknown key, or no values.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise ConfigurationError(
            f"expected KEY=V1,V2 or KEY=auto, got {text!r} (for example batch_size=1,8,32)"
        )
    path = parameter(key.strip()).path
    if raw.strip() == AUTO:
        return path, [AUTO]
    parsed = parse_value(raw)
    if isinstance(parsed, list):
        return path, parsed
    return path, [parse_value(part) for part in raw.split(",")]


def _axis_values(path: str, raw: Any) -> list[Any]:
    param = parameter(path)
    if raw == AUTO or raw == [AUTO]:
        if not param.sweep_values:
            raise ConfigurationError(
                f"{param.path} has no automatic sweep values; list the values to sweep"
            )
        return list(param.sweep_values)
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if not values:
        raise ConfigurationError(f"{param.path}: a sweep axis needs at least one value")
    for value in values:
        check_value(param.path, value)
    return list(dict.fromkeys(values)) if all(_hashable(v) for v in values) else values


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def merge_axes(layers: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Sweep axes from several sources, later ones replacing an axis of the same parameter;
    keys are canonicalised (``temperature`` -> ``sampling.temperature``) and values checked.

    Raises:
        ConfigurationError: an unknown parameter, a value it cannot take, or ``auto`` for a
            parameter without sweep values.
    """
    axes: dict[str, list[Any]] = {}
    for layer in layers:
        for key, raw in layer.items():
            path = parameter(key).path
            try:
                values = _axis_values(path, raw)
            except ConfigurationError as e:
                raise ConfigurationError(f"sweep of {key}: {e}") from e
            axes[path] = values  # a replaced axis keeps its place in the id
    return axes


def expand(
    axes: Mapping[str, Sequence[Any]],
    *,
    resolve: Callable[[SweepCase], CaseConfig],
    gpu_available: Callable[[], bool],
    origins: Mapping[str, str] | None = None,
) -> list[SweepCase]:
    """Every combination of ``axes``, each resolved with ``resolve`` (given the combination;
    it adds the markers, ini and command line around its values).

    A combination the models reject becomes a skipped case whose reason is the rule it breaks;
    one that needs a GPU on a machine without one is skipped likewise.

    Args:
        axes: Values per parameter path, in id order.
        resolve: Resolves one combination into its config.
        gpu_available: Whether a GPU is visible (asked only when a combination needs one).
        origins: Where each axis comes from (a path not listed is a marker's).
    """
    paths = list(axes)
    from_where = {path: origin for path, origin in (origins or {}).items() if path in axes}
    cases = []
    for combination in itertools.product(*(axes[path] for path in paths)):
        values = dict(zip(paths, combination, strict=True))
        case = SweepCase(values=values, id=case_id(values, paths), origins=from_where)
        cases.append(_with_skip(case, resolve, gpu_available))
    return cases


def _with_skip(
    case: SweepCase,
    resolve: Callable[[SweepCase], CaseConfig],
    gpu_available: Callable[[], bool],
) -> SweepCase:
    try:
        config = resolve(case)
    except ConfigurationError as e:
        return replace(case, skip_reason=f"invalid combination: {e}")
    for rule in constraints(needs="gpu"):
        if not rule.check(config) and not gpu_available():
            return replace(case, skip_reason=f"{rule.explain(config)}; no GPU is visible")
    return case
