"""Introspection: every parameter of a case, read from the Pydantic models themselves.

For each dotted parameter path (``batch_size``, ``transformers.attn_implementation``) it gives
the type, default, bounds, choices, description, the backends it applies to, whether changing
it needs a new model load, and its sweep values. Sweeps, ``llem params`` and the parameter
reference are built from this; adding a field to a model makes it sweepable and documented.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pytest_llem.config.models import BUILTIN_BACKENDS, CONSTRAINTS, CaseConfig, Constraint
from pytest_llem.config.resolve import SAMPLING_ALIASES
from pytest_llem.exceptions import ConfigurationError

__all__ = [
    "Parameter",
    "canonical_path",
    "case_id",
    "constraints",
    "parameter",
    "parameters",
]

#: Groups of the case config that belong to one backend each.
_BACKEND_GROUPS = frozenset(BUILTIN_BACKENDS)


@dataclass(frozen=True)
class Parameter:
    """One settable parameter, as the models define it."""

    path: str
    type: str
    default: Any
    description: str
    choices: tuple[Any, ...] | None
    minimum: float | None
    maximum: float | None
    exclusive_minimum: bool
    exclusive_maximum: bool
    backends: tuple[str, ...] | None
    reload: bool
    sweep_values: tuple[Any, ...]
    short: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "path": self.path,
            "type": self.type,
            "default": self.default,
            "description": self.description,
            "choices": list(self.choices) if self.choices is not None else None,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "exclusive_minimum": self.exclusive_minimum,
            "exclusive_maximum": self.exclusive_maximum,
            "backends": list(self.backends) if self.backends is not None else "all",
            "reload": self.reload,
            "sweep_values": list(self.sweep_values),
            "id": self.short,
        }


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    if get_origin(annotation) is Literal:
        return tuple(get_args(annotation))
    return None


def _type_name(annotation: Any) -> str:
    choices = _literal_choices(annotation)
    if choices is not None:
        return "choice"
    origin = get_origin(annotation)
    if origin is Annotated:  # a constrained member of a union (``repeat``: N or auto)
        return _type_name(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> tuple[float | None, float | None, bool, bool]:
    low = high = None
    low_open = high_open = False
    constraints = list(field.metadata)
    for arg in get_args(field.annotation):  # a constrained member of a union (``repeat``)
        if get_origin(arg) is Annotated:
            for item in arg.__metadata__:
                constraints.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    for item in constraints:
        if isinstance(item, annotated_types.Ge):
            low = float(item.ge)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Gt):
            low, low_open = float(item.gt), True  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            high = float(item.le)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Lt):
            high, high_open = float(item.lt), True  # type: ignore[arg-type]
    return low, high, low_open, high_open


def _derived_sweep(
    annotation: Any, choices: tuple[Any, ...] | None, bounds: tuple[Any, ...]
) -> tuple[Any, ...]:
    """Sweep values from the type alone: every choice, both booleans, or a bounded number's
    bounds and middle."""
    if choices is not None:
        return tuple(c for c in choices if c not in ("auto", "custom")) or choices
    base = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    kind = base[0]
    if kind is bool:
        return (False, True)
    low, high, low_open, high_open = bounds
    if kind in (int, float) and low is not None and high is not None:
        cast = int if kind is int else float
        step = 1 if kind is int else (high - low) / 100
        first = low + step if low_open else low
        last = high - step if high_open else high
        return tuple(dict.fromkeys((cast(first), cast((first + last) / 2), cast(last))))
    return ()


def _describe(path: str, field: FieldInfo, group: str | None) -> Parameter:
    annotation = field.annotation
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    choices = _literal_choices(annotation)
    bounds = _bounds(field)
    if path == "backend":
        sweep: tuple[Any, ...] = BUILTIN_BACKENDS
    elif "sweep" in extra:
        sweep = tuple(extra["sweep"])  # type: ignore[arg-type]
    else:
        sweep = _derived_sweep(annotation, choices, bounds)
    default = field.get_default(call_default_factory=True)
    return Parameter(
        path=path,
        type=_type_name(annotation),
        default=default.model_dump() if isinstance(default, BaseModel) else default,
        description=field.description or "",
        choices=choices,
        minimum=bounds[0],
        maximum=bounds[1],
        exclusive_minimum=bounds[2],
        exclusive_maximum=bounds[3],
        backends=(group,) if group in _BACKEND_GROUPS else None,
        reload=bool(extra.get("load", False)),
        sweep_values=sweep,
        short=str(extra.get("id", path.rsplit(".", 1)[-1])),
    )


def _walk(model: type[BaseModel], prefix: str, group: str | None) -> Iterable[Parameter]:
    for name, field in model.model_fields.items():
        sub = _sub_model(field.annotation)
        if sub is not None:
            yield from _walk(sub, f"{prefix}{name}.", name)
        else:
            yield _describe(f"{prefix}{name}", field, group)


def parameters(*, backend: str | None = None) -> list[Parameter]:
    """Every parameter; with ``backend``, those that apply to it (common ones included)."""
    every = list(_walk(CaseConfig, "", None))
    if backend is None:
        return every
    return [p for p in every if p.backends is None or backend in p.backends]


def canonical_path(name: str) -> str:
    """The dotted path a sweep or option key names (``temperature`` and ``sampling`` are
    short for ``sampling.temperature`` and ``sampling.preset``)."""
    if name == "sampling":
        return "sampling.preset"
    return SAMPLING_ALIASES.get(name, name)


def parameter(name: str) -> Parameter:
    """One parameter by path or short name.

    Raises:
        ConfigurationError: no such parameter (with the closest names).
    """
    path = canonical_path(name)
    known = {p.path: p for p in parameters()}
    if path in known:
        return known[path]
    close = difflib.get_close_matches(path, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigurationError(f"unknown parameter {name!r}{hint} (see `llem params`)")


def constraints(*, needs: str | None = None) -> tuple[Constraint, ...]:
    """The declared rules between parameters (all, or those of one kind)."""
    return tuple(c for c in CONSTRAINTS if needs is None or c.needs == needs)


def _id_part(param: Parameter, value: Any) -> str:
    if isinstance(value, bool):
        return param.short if value else f"no-{param.short}"
    if value is None:
        return f"{param.short}-none"
    if isinstance(value, (int, float)):
        text = f"{value:g}" if isinstance(value, float) else str(value)
        return f"{param.short}{text}"
    text = str(value)
    if param.path in ("model", "prompts"):
        text = text.rstrip("/").rsplit("/", 1)[-1]
    return text


def case_id(assignment: Mapping[str, Any], order: Sequence[str] | None = None) -> str:
    """A short readable id for a sweep combination: ``bs8-bfloat16``."""
    keys = order if order is not None else list(assignment)
    return "-".join(_id_part(parameter(key), assignment[key]) for key in keys)
