"""Configuration: the Pydantic models of a case and how layers of settings resolve into one."""

from __future__ import annotations

from pytest_llem.config.models import (
    BUILTIN_BACKENDS,
    SAMPLING_PRESETS,
    CaseConfig,
    SamplingConfig,
    TransformersConfig,
    load_fields,
)
from pytest_llem.config.resolve import known_paths, parse_assignment, resolve_case

__all__ = [
    "BUILTIN_BACKENDS",
    "SAMPLING_PRESETS",
    "CaseConfig",
    "SamplingConfig",
    "TransformersConfig",
    "known_paths",
    "load_fields",
    "parse_assignment",
    "resolve_case",
]
