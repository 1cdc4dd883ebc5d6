"""What collection does with llem tests: read their markers, expand their sweeps, resolve every
case once (so a bad parameter is a collection error naming the test) and order the items so
that cases sharing a model load run together.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pytest

from pytest_llem.config.models import CaseConfig
from pytest_llem.config.profiles import resolve_profile_values
from pytest_llem.config.resolve import (
    flatten_paths,
    lookup_path,
    merge_layers,
    resolve_case,
    set_path,
)
from pytest_llem.exceptions import ConfigurationError, LlemError
from pytest_llem.session import LlemSession
from pytest_llem.sweep import (
    CLI_ORIGIN,
    INI_ORIGIN,
    MARKER_ORIGIN,
    SweepCase,
    expand,
    merge_axes,
)

__all__ = [
    "BUDGET_MARKER",
    "MARKER",
    "SWEEP_FIXTURE",
    "SWEEP_MARKER",
    "budget_rules",
    "case_node_id",
    "gpu_visible",
    "item_load_key",
    "mark_load_groups",
    "marker_layers",
    "order_by_load",
    "overruled_overrides",
    "resolve_for",
    "skipped_params",
    "sweep_case_of",
    "sweep_cases",
    "sweep_conflict",
    "sweep_layer",
    "sweep_mismatch",
]

MARKER = "llem"
SWEEP_MARKER = "llem_sweep"
BUDGET_MARKER = "llem_budget"
#: The fixture a sweep parametrizes: the combination's values by parameter path.
SWEEP_FIXTURE = "llem_sweep_params"

_LOAD_KEY = pytest.StashKey[object]()
_GPU = pytest.StashKey[bool]()


def _layers(node: Any, name: str, profile: str = "smoke") -> list[dict[str, Any]]:
    """The markers' keyword parameters, farthest first, ``by_profile`` values resolved."""
    layers = []
    for marker in reversed(list(node.iter_markers(name))):
        if marker.args:
            raise ConfigurationError(
                f"@pytest.mark.{name} takes keyword parameters only, got {marker.args!r}"
            )
        layers.append(resolve_profile_values(dict(marker.kwargs), profile))
    return layers


def budget_rules(node: Any, profile: str = "smoke") -> list[Any]:
    """The limits of the ``llem_budget`` markers on ``node`` (closest marker wins per metric).

    Raises:
        GateError: a budget names an unknown metric.
    """
    from pytest_llem.results.gate import parse_budget

    merged: dict[str, float] = {}
    for layer in _layers(node, BUDGET_MARKER, profile):
        merged.update(layer)
    return list(parse_budget(merged)) if merged else []


def marker_layers(node: Any, profile: str = "smoke") -> list[dict[str, Any]]:
    """The ``llem`` markers' parameters on ``node``, farthest (module) first, with every
    ``by_profile`` value taken for ``profile``.

    Raises:
        ConfigurationError: a marker has positional arguments.
    """
    return _layers(node, MARKER, profile)


def sweep_layer(values: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep combination's values (by dotted path) as a nested settings layer."""
    layer: dict[str, Any] = {}
    for path, value in values.items():
        set_path(layer, path, value)
    return layer


def resolve_for(
    node: Any,
    session: LlemSession,
    overrides: Mapping[str, Any],
    sweep: SweepCase | None = None,
) -> CaseConfig:
    """Resolve a case. Precedence, lowest first: model defaults, ``llem`` markers (farthest
    first), the marker sweep's values, ``llem.run`` overrides, the ini keys and the ini sweep's
    values, the command line and the command-line sweep's values."""
    layers = _settings_layers(node, session, overrides, sweep)
    return resolve_case(layers, backends=session.options.backend_names)


def _settings_layers(
    node: Any, session: LlemSession, overrides: Mapping[str, Any], sweep: SweepCase | None
) -> list[dict[str, Any]]:
    options = session.options
    sweep = sweep or SweepCase({}, "")
    profile = options.profile.name
    return [
        *marker_layers(node, profile),
        sweep.layer(MARKER_ORIGIN),
        resolve_profile_values(dict(overrides), profile),
        options.ini_layer,
        sweep.layer(INI_ORIGIN),
        options.cli_layer,
        sweep.layer(CLI_ORIGIN),
    ]


def skipped_params(node: Any, session: LlemSession, sweep: SweepCase) -> dict[str, Any]:
    """The parameters of a sweep combination that is skipped, as far as they resolve: the
    resolved config, or (for a combination a rule forbids) the settings as given over the
    model defaults, unvalidated."""
    try:
        return resolve_for(node, session, {}, sweep).model_dump(mode="json")
    except LlemError:
        defaults = CaseConfig().model_dump(mode="json")
        return merge_layers([defaults, *_settings_layers(node, session, {}, sweep)])


def sweep_conflict(overrides: Mapping[str, Any], sweep: SweepCase | None) -> str | None:
    """Why ``llem.run(**overrides)`` cannot run in this sweep combination, or None.

    An override may not change a value the marker sweep put in the test id: the id would name
    a value that did not run. (Ini and command-line sweeps simply win over overrides.)
    """
    if sweep is None or not overrides:
        return None
    given = merge_layers([overrides])
    for path, swept in sweep.values.items():
        if sweep.origin(path) != MARKER_ORIGIN:
            continue  # ini and command-line sweeps win over overrides
        found, value = lookup_path(given, path)
        # A group (``sampling={...}``) sets some fields only; sweep_mismatch catches the rest.
        if found and not isinstance(value, Mapping) and value != swept:
            return (
                f"llem.run({path}={value!r}) conflicts with the swept value {path}={swept!r} "
                "named in the test id"
            )
    return None


def sweep_mismatch(config: CaseConfig, sweep: SweepCase | None) -> str | None:
    """Why a resolved case does not run the values its test id names, or None.

    The last guard of the id: a sampling preset set above a swept sampling field, say, would
    replace the swept value.
    """
    if sweep is None:
        return None
    resolved = config.model_dump(mode="json")
    for path, swept in sweep.values.items():
        found, value = lookup_path(resolved, path)
        if found and not isinstance(value, Mapping) and value != swept:
            return (
                f"the test id names {path}={swept!r} but {path}={value!r} would run: a setting "
                "above the sweep replaces it"
            )
    return None


def overruled_overrides(
    overrides: Mapping[str, Any], session: LlemSession, sweep: SweepCase | None
) -> list[str]:
    """Notes on the ``llem.run`` overrides that the ini file or the command line overruled."""
    options = session.options
    sweep = sweep or SweepCase({}, "")
    higher = (
        ("the command line", [sweep.layer(CLI_ORIGIN), options.cli_layer]),
        ("the ini file", [sweep.layer(INI_ORIGIN), options.ini_layer]),
    )
    notes = []
    for path, value in flatten_paths(merge_layers([overrides])).items():
        for source, layers in higher:
            found, winner = next(
                (hit for hit in (lookup_path(layer, path) for layer in layers) if hit[0]),
                (False, None),
            )
            if found and not isinstance(winner, Mapping):
                if winner != value:
                    notes.append(
                        f"llem.run({path}={value!r}) was overruled by {source}: "
                        f"{path}={winner!r} ran"
                    )
                break
    return notes


def gpu_visible(config: pytest.Config) -> bool:
    """Whether NVML sees a GPU (asked once per session, only when a sweep needs to know)."""
    if _GPU not in config.stash:
        from pytest_llem.meters.inventory import gpu_inventory

        config.stash[_GPU] = bool(gpu_inventory()[0])
    return config.stash[_GPU]


def sweep_cases(definition: pytest.Function, session: LlemSession) -> list[SweepCase]:
    """The sweep combinations of a test (empty when it sweeps nothing), each resolved.

    Raises:
        LlemError: a marker or sweep names an unknown parameter or a value it cannot take, or
            (without a sweep) the test's parameters do not resolve.
    """
    budget_rules(definition, session.options.profile.name)
    axes, origins = _axes(definition, session)
    if not axes:
        resolve_for(definition, session, {})
        return []
    return expand(
        axes,
        resolve=lambda case: resolve_for(definition, session, {}, case),
        gpu_available=lambda: gpu_visible(definition.config),
        origins=origins,
    )


_RANK = {MARKER_ORIGIN: 0, INI_ORIGIN: 1, CLI_ORIGIN: 2}


def _axes(
    definition: pytest.Function, session: LlemSession
) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """The test's sweep axes and where each comes from. A parameter that a higher source sets
    to one value has its axis replaced by that value, so the test id names the value that runs
    (combinations that differ only there collapse into one)."""
    options = session.options
    axes = merge_axes(_layers(definition, SWEEP_MARKER, options.profile.name))
    origins = dict.fromkeys(axes, MARKER_ORIGIN)
    for origin, more in (
        (INI_ORIGIN, options.ini_sweep_axes),
        (CLI_ORIGIN, options.cli_sweep_axes),
    ):
        for path, values in more.items():
            axes[path] = list(values)  # a replaced axis keeps its place in the id
            origins[path] = origin
    for origin, layer in ((INI_ORIGIN, options.ini_layer), (CLI_ORIGIN, options.cli_layer)):
        for path in axes:
            found, value = lookup_path(layer, path)
            # A group (``sampling={...}``) only sets some fields: it does not replace an axis.
            if found and not isinstance(value, Mapping) and _RANK[origins[path]] < _RANK[origin]:
                axes[path] = [value]
                origins[path] = origin
    return axes, origins


def sweep_case_of(item: pytest.Item) -> SweepCase | None:
    """The sweep combination an item runs (None for a test without a sweep)."""
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get(SWEEP_FIXTURE) if callspec is not None else None
    return case if isinstance(case, SweepCase) else None


def item_load_key(item: pytest.Item, session: LlemSession) -> object:
    """The model-load key of an llem item (None when its parameters do not resolve), kept in
    the item's stash."""
    if _LOAD_KEY in item.stash:
        return item.stash[_LOAD_KEY]
    from pytest_llem.backends.base import load_key

    sweep = sweep_case_of(item)
    try:
        key: object = load_key(resolve_for(item, session, {}, sweep))
    except LlemError:
        key = None
    item.stash[_LOAD_KEY] = key
    return key


def order_by_load(items: list[pytest.Item], session: LlemSession) -> list[pytest.Item]:
    """Items reordered so that llem cases needing the same model load run together: each group
    takes the place of its first case, other tests keep theirs. With a shuffle seed, the cases
    of each group are shuffled (seeded, so the order can be reproduced)."""
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        if "llem" in getattr(item, "fixturenames", ()):
            groups.setdefault(repr(item_load_key(item, session)), []).append(item)
    seed = session.options.shuffle_seed
    if seed is None and len(groups) <= 1:
        return items
    if seed is not None:
        rng = random.Random(seed)
        for group in groups.values():
            rng.shuffle(group)
    ordered: list[pytest.Item] = []
    emitted: set[str] = set()
    for item in items:
        if "llem" not in getattr(item, "fixturenames", ()):
            ordered.append(item)
            continue
        key = repr(item.stash[_LOAD_KEY])
        if key not in emitted:
            emitted.add(key)
            ordered.extend(groups[key])
    return ordered


#: The xdist group an item was put in (its node id gains ``@<group>`` under loadgroup).
LOAD_GROUP = pytest.StashKey[str]()


def mark_load_groups(items: list[pytest.Item], session: LlemSession) -> dict[str, str]:
    """Mark llem items with ``xdist_group`` by model-load key, so the cases of one load
    configuration go to one worker, which loads it once.

    Returns:
        Node id -> group name of every llem item (the workers hand it to the scheduler).
    """
    from pytest_llem.workers import load_group_name

    groups: dict[str, str] = {}
    for item in items:
        if "llem" not in getattr(item, "fixturenames", ()):
            continue
        name = load_group_name(item_load_key(item, session))
        item.stash[LOAD_GROUP] = name
        item.add_marker(pytest.mark.xdist_group(name=name))
        groups[item.nodeid] = name
    return groups


def case_node_id(item: pytest.Item) -> str:
    """The item's node id without the ``@group`` suffix xdist adds under loadgroup, so a case
    has the same id in a parallel run as in a serial one."""
    group = item.stash.get(LOAD_GROUP, None)
    if group is not None:
        return item.nodeid.removesuffix(f"@{group}")
    return item.nodeid
