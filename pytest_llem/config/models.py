"""Pydantic models for a benchmark case: the single source of truth for every parameter.

Each field carries its type, default, bounds and description, and in ``json_schema_extra``:
whether changing it needs a new model load (``load``), the values a sweep takes for ``"auto"``
(``sweep``, else they are derived from the type and bounds), and its short name in test ids
(``id``). Rules between fields are declared once, in :data:`CONSTRAINTS`; the model's validator
and the sweep's pruning both read them. Introspection (``config.introspection``) reads all of
this; nothing keeps a parallel list.

The models live in modules of their own (``config.case``, ``config.engines``,
``config.sampling``, ``config.traffic``, ``config.constraints``); this module gathers them under
the one name the rest of the plugin imports.
"""

from __future__ import annotations

from pytest_llem.config.case import BUILTIN_BACKENDS, CaseConfig, load_fields
from pytest_llem.config.constraints import CONSTRAINTS, Constraint
from pytest_llem.config.engines import (
    EndpointConfig,
    TensorRTConfig,
    TransformersConfig,
    VllmConfig,
)
from pytest_llem.config.sampling import SAMPLING_PRESETS, SamplingConfig
from pytest_llem.config.traffic import SloConfig, TrafficConfig

__all__ = [
    "BUILTIN_BACKENDS",
    "CONSTRAINTS",
    "SAMPLING_PRESETS",
    "CaseConfig",
    "Constraint",
    "EndpointConfig",
    "SamplingConfig",
    "SloConfig",
    "TensorRTConfig",
    "TrafficConfig",
    "TransformersConfig",
    "VllmConfig",
    "load_fields",
]
