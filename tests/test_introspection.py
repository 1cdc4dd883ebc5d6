"""Introspection of the config models: parameters, sweep values, rules and test ids."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from pytest_llem.config import introspection
from pytest_llem.config.introspection import (
    _derived_sweep,
    _describe,
    canonical_path,
    case_id,
    constraints,
    parameter,
    parameters,
)
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import ConfigurationError


def test_every_leaf_field_is_a_parameter():
    paths = [p.path for p in parameters()]
    assert "batch_size" in paths
    assert "sampling.temperature" in paths
    assert "transformers.attn_implementation" in paths
    assert "sampling" not in paths  # groups are not parameters; their fields are
    assert len(paths) == len(set(paths))


def test_a_parameter_carries_its_metadata():
    bs = parameter("batch_size")
    assert (bs.type, bs.default, bs.minimum, bs.maximum) == ("int", 1, 1, 4096)
    assert bs.sweep_values == (1, 4, 16, 64)  # the explicit list in the field's metadata
    assert bs.reload is False
    assert bs.backends is None
    assert bs.description == CaseConfig.model_fields["batch_size"].description


def test_literal_choices_and_backend_scope():
    attn = parameter("transformers.attn_implementation")
    assert attn.choices == ("auto", "eager", "sdpa", "flash_attention_2")
    assert attn.backends == ("transformers",)
    assert attn.reload is True
    other_engines = {p.path for p in parameters() if p.backends not in (None, ("transformers",))}
    assert [p.path for p in parameters(backend="transformers")] == [
        p.path for p in parameters() if p.path not in other_engines
    ]
    assert not any(p.path.startswith("transformers.") for p in parameters(backend="other"))


def test_sweep_values_derived_from_the_type():
    class Probe(BaseModel):
        flag: bool = False
        mode: Literal["auto", "fast", "slow"] = "auto"
        width: int = Field(default=4, ge=2, le=10)
        ratio: float = Field(default=0.5, gt=0.0, le=1.0)
        name: str = "x"

    described = {n: _describe(n, f, None) for n, f in Probe.model_fields.items()}
    assert described["flag"].sweep_values == (False, True)
    assert described["mode"].sweep_values == ("fast", "slow")  # "auto" is not a value to sweep
    assert described["width"].sweep_values == (2, 6, 10)  # bounds and the middle
    low, mid, high = described["ratio"].sweep_values
    assert (low, high) == (pytest.approx(0.01), 1.0)  # an open bound is stepped inside
    assert mid == pytest.approx(0.505)
    assert described["name"].sweep_values == ()
    assert _derived_sweep(int, None, (None, None, False, False)) == ()


def test_unknown_parameter_suggests_close_names():
    with pytest.raises(ConfigurationError, match=r"'batch_sz'.*batch_size"):
        parameter("batch_sz")


def test_short_names_canonicalise():
    assert canonical_path("temperature") == "sampling.temperature"
    assert canonical_path("sampling") == "sampling.preset"
    assert parameter("sampling").path == "sampling.preset"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"batch_size": 8, "dtype": "bfloat16"}, "bs8-bfloat16"),
        ({"temperature": 0.5}, "t0.5"),
        ({"transformers.torch_compile": True}, "compile"),
        ({"transformers.torch_compile": False}, "no-compile"),
        ({"min_new_tokens": None}, "min-none"),
        ({"model": "/models/org/llama-3/"}, "llama-3"),
    ],
)
def test_case_ids_are_short_and_readable(values, expected):
    assert case_id(values) == expected


def test_constraints_are_data_the_model_enforces():
    rules = {rule.name: rule for rule in constraints()}
    rule = rules["min-within-max"]
    assert rule.parameters == ("min_new_tokens", "max_new_tokens")
    assert rule.check(CaseConfig(max_new_tokens=8, min_new_tokens=8))
    with pytest.raises(ValueError, match="min_new_tokens must not exceed"):
        CaseConfig(max_new_tokens=4, min_new_tokens=8)
    assert {rule.needs for rule in constraints(needs="gpu")} == {"gpu"}
    assert not rules["cuda-needs-gpu"].check(CaseConfig(device="cuda"))


def test_a_new_field_is_introspected_with_no_other_edit(monkeypatch: pytest.MonkeyPatch):
    class Extended(CaseConfig):
        new_knob: int = Field(default=3, ge=1, le=5, description="A knob added later.")

    monkeypatch.setattr(introspection, "CaseConfig", Extended)
    knob = parameter("new_knob")
    assert knob.sweep_values == (1, 3, 5)
    assert knob.description == "A knob added later."
