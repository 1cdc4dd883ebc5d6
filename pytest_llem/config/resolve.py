"""Turning options, ini keys, markers and ``--llem-set KEY=VALUE`` into a validated CaseConfig.

Layers are plain nested dicts merged in order of precedence (command line > ini >
``llem.run`` overrides > marker sweep > markers > model default; ``collection.resolve_for``
stacks them); validation happens once, on the merged result, so an error names the parameter
path whatever layer it came from.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, cast, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

from pytest_llem.config.models import BUILTIN_BACKENDS, CaseConfig
from pytest_llem.exceptions import ConfigurationError

__all__ = [
    "SAMPLING_ALIASES",
    "check_value",
    "flatten_paths",
    "format_validation_error",
    "known_paths",
    "lookup_path",
    "merge_layers",
    "parse_assignment",
    "parse_value",
    "resolve_case",
    "set_path",
]

#: Top-level names accepted for fields that live under ``sampling``.
SAMPLING_ALIASES = {
    name: f"sampling.{name}" for name in ("do_sample", "temperature", "top_p", "top_k", "preset")
}


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _sub_model(arg)
            if found is not None:
                return found
    return None


def known_paths(model: type[BaseModel] = CaseConfig, prefix: str = "") -> list[str]:
    """Return every settable dotted parameter path of ``model``, nested groups included."""
    paths: list[str] = []
    for name, field in model.model_fields.items():
        paths.append(f"{prefix}{name}")
        sub = _sub_model(field.annotation)
        if sub is not None:
            paths.extend(known_paths(sub, f"{prefix}{name}."))
    return paths


def parse_value(text: str) -> Any:
    """Parse a command-line value: JSON where it parses (numbers, true/false, null, lists,
    objects), a case-insensitive boolean word, else the string itself."""
    stripped = text.strip()
    lowered = stripped.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("null", "none"):
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return stripped


def parse_assignment(text: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` and check that KEY names a parameter.

    Raises:
        ConfigurationError: no ``=``, an empty key, or a key that is not a parameter.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigurationError(f"expected KEY=VALUE, got {text!r} (for example batch_size=8)")
    key = SAMPLING_ALIASES.get(key, key)
    paths = known_paths()
    if key not in paths:
        close = [p for p in paths if p.split(".")[-1] == key.split(".")[-1]]
        close = close or difflib.get_close_matches(key, paths, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigurationError(f"unknown parameter {key!r}{hint} (see `llem params`)")
    return key, parse_value(raw)


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at dotted ``path`` inside a nested dict, creating groups as needed."""
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "sampling":
            child = {"preset": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def lookup_path(tree: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """The value at dotted ``path`` inside a nested dict: ``(True, value)``, or ``(False, None)``
    when the path, or a group on the way to it, is not set there."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def flatten_paths(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested dict by dotted path (``{"sampling.temperature": 0.7}``); an empty
    group is a leaf of its own."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_paths(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def merge_layers(layers: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Deep-merge dicts, later layers winning; nested groups merge key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            flat_key = SAMPLING_ALIASES.get(key, key)
            if "." in flat_key:
                set_path(merged, flat_key, value)
                continue
            current = merged.get(key)
            if key == "sampling" and isinstance(value, str):
                value = {"preset": value}
            if key == "sampling" and isinstance(current, dict) and "preset" in (value or {}):
                # A new preset replaces the sampling settings of lower layers.
                merged[key] = dict(value)
            elif isinstance(current, dict) and isinstance(value, Mapping):
                merged[key] = merge_layers([current, value])
            else:
                merged[key] = dict(value) if isinstance(value, Mapping) else value
    return merged


def format_validation_error(error: ValidationError) -> str:
    """One readable line per problem: ``path: message (got value)``."""
    lines = []
    for item in error.errors(include_url=False):
        path = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown parameter"
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{path}: {message}{shown}" if path else message)
    return "; ".join(lines)


def resolve_case(
    layers: Iterable[Mapping[str, Any]], *, backends: Iterable[str] = BUILTIN_BACKENDS
) -> CaseConfig:
    """Merge ``layers`` (lowest precedence first) and validate them into a CaseConfig.

    Raises:
        ConfigurationError: the merged parameters do not validate.
    """
    merged = merge_layers(layers)
    try:
        return CaseConfig.model_validate(merged, context={"backends": tuple(backends)})
    except ValidationError as e:
        raise ConfigurationError(format_validation_error(e)) from e


def _field_at(path: str) -> Any:
    model: type[BaseModel] | None = CaseConfig
    field = None
    for part in path.split("."):
        if model is None or part not in model.model_fields:
            raise ConfigurationError(f"unknown parameter {path!r}")
        field = model.model_fields[part]
        model = _sub_model(field.annotation)
    return field


def check_value(path: str, value: Any) -> Any:
    """Validate one parameter's value on its own (type, bounds, choices), without the rules
    that relate it to other parameters: those are checked once a case is resolved.

    Raises:
        ConfigurationError: naming the parameter, what is wrong and the allowed values.
    """
    path = SAMPLING_ALIASES.get(path, path)
    field = _field_at(path)
    adapter: TypeAdapter[Any] = TypeAdapter(cast(Any, Annotated[field.annotation, field]))
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        problems = "; ".join(
            item["msg"].removeprefix("Value error, ") for item in e.errors(include_url=False)
        )
        raise ConfigurationError(f"{path}={value!r}: {problems}") from e
