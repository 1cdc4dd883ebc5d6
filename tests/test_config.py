"""The case config models and how layers of settings resolve into one case."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_llem.config.models import CaseConfig, load_fields
from pytest_llem.config.resolve import (
    check_value,
    known_paths,
    merge_layers,
    parse_assignment,
    parse_value,
    resolve_case,
)
from pytest_llem.exceptions import ConfigurationError


def test_defaults_validate_and_describe_every_field():
    config = CaseConfig()
    assert config.model == "llem-tiny"
    assert config.backend == "transformers"
    for name, field in CaseConfig.model_fields.items():
        assert field.description, f"{name} has no description"


def test_unknown_parameter_is_rejected():
    with pytest.raises(ConfigurationError, match="bogus: unknown parameter"):
        resolve_case([{"bogus": 1}])


def test_min_new_tokens_may_not_exceed_max():
    with pytest.raises(ConfigurationError, match="min_new_tokens"):
        resolve_case([{"max_new_tokens": 8, "min_new_tokens": 9}])


def test_bounds_are_enforced():
    with pytest.raises(ConfigurationError, match="batch_size"):
        resolve_case([{"batch_size": 0}])


def test_float16_on_cpu_is_rejected():
    with pytest.raises(ConfigurationError, match="float16"):
        resolve_case([{"device": "cpu", "dtype": "float16"}])


def test_later_layers_win_and_groups_merge_key_by_key():
    case = resolve_case(
        [
            {"batch_size": 2, "transformers": {"attn_implementation": "eager"}},
            {"batch_size": 8, "transformers": {"torch_compile": False}},
        ]
    )
    assert case.batch_size == 8
    assert case.transformers.attn_implementation == "eager"


def test_sampling_presets_and_flat_fields():
    assert resolve_case([{"sampling": "creative"}]).sampling.top_p == 0.95
    case = resolve_case([{"temperature": 0.7}])
    assert case.sampling.do_sample is True
    assert case.sampling.temperature == 0.7
    assert resolve_case([{"sampling": "deterministic"}]).sampling.do_sample is False
    with pytest.raises(ConfigurationError, match="do_sample"):
        resolve_case([{"do_sample": False, "temperature": 0.5}])


def test_a_higher_layer_preset_replaces_lower_sampling():
    case = resolve_case([{"temperature": 0.5}, {"sampling": "deterministic"}])
    assert case.sampling.do_sample is False
    assert case.sampling.temperature == 1.0


def test_unknown_backend_lists_choices():
    with pytest.raises(ConfigurationError, match="choose from: transformers"):
        resolve_case([{"backend": "nope"}])
    assert resolve_case([{"backend": "mine"}], backends=("transformers", "mine")).backend == "mine"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8", 8),
        ("0.5", 0.5),
        ("true", True),
        ("False", False),
        ("none", None),
        ("sdpa", "sdpa"),
        ("[1, 2]", [1, 2]),
    ],
)
def test_parse_value(text, expected):
    assert parse_value(text) == expected


def test_parse_assignment_paths_and_aliases():
    assert parse_assignment("batch_size=8") == ("batch_size", 8)
    assert parse_assignment("transformers.attn_implementation=sdpa") == (
        "transformers.attn_implementation",
        "sdpa",
    )
    assert parse_assignment("temperature=0.5") == ("sampling.temperature", 0.5)


def test_parse_assignment_errors_name_the_key():
    with pytest.raises(ConfigurationError, match=r"'batch_sz'.*batch_size"):
        parse_assignment("batch_sz=3")
    with pytest.raises(ConfigurationError, match=r"transformers\.attn_implementation"):
        parse_assignment("attn_implementation=sdpa")
    with pytest.raises(ConfigurationError, match="KEY=VALUE"):
        parse_assignment("batch_size")


def test_check_value_lists_allowed_choices():
    with pytest.raises(ConfigurationError, match="'auto', 'cpu' or 'cuda'"):
        check_value("device", "tpu")
    assert check_value("min_new_tokens", 64) == 64  # checked against max only per case


def test_known_paths_cover_nested_groups():
    paths = known_paths()
    assert "transformers.attn_implementation" in paths
    assert "sampling.temperature" in paths


def test_load_fields_are_the_ones_that_need_a_new_model():
    fields = load_fields()
    assert {"model", "backend", "device", "dtype"} <= set(fields)
    assert "transformers.attn_implementation" in fields
    assert "batch_size" not in fields
    assert "transformers.cache_implementation" not in fields


def test_merge_layers_dotted_keys():
    merged = merge_layers([{"transformers.torch_compile": True}])
    assert merged == {"transformers": {"torch_compile": True}}


class _Node:
    """A test function's markers, closest first, as ``iter_markers`` gives them."""

    def __init__(self, *marks: pytest.MarkDecorator) -> None:
        self._marks = [m.mark for m in marks]

    def iter_markers(self, name: str) -> list[pytest.Mark]:
        return [m for m in self._marks if m.name == name]


def _resolved(
    *marks: pytest.MarkDecorator,
    overrides: dict[str, object] | None = None,
    ini: dict[str, object] | None = None,
    cli: dict[str, object] | None = None,
) -> tuple[int, str | None]:
    """The seed a case runs with, and its test id, from each source of settings."""
    from pathlib import Path
    from types import SimpleNamespace

    from pytest_llem.collection import resolve_for, sweep_cases, sweep_conflict
    from pytest_llem.options import build_options

    options = build_options(cli=cli or {}, ini=ini or {}, invocation_dir=Path.cwd())
    session: Any = SimpleNamespace(options=options)
    node = _Node(*marks)
    cases = sweep_cases(node, session)  # type: ignore[arg-type]
    case = cases[0] if cases else None
    conflict = sweep_conflict(overrides or {}, case)
    if conflict is not None:
        raise ConfigurationError(conflict)
    config = resolve_for(node, session, overrides or {}, case)
    return config.seed, case.id if case is not None else None


def test_precedence_is_one_ordered_rule():
    closer, farther = pytest.mark.llem(seed=2), pytest.mark.llem(seed=1)
    sweep = pytest.mark.llem_sweep(seed=[3])
    assert _resolved(closer, farther) == (2, None)
    assert _resolved(closer, sweep) == (3, "seed3")
    assert _resolved(closer, overrides={"seed": 4}) == (4, None)
    assert _resolved(overrides={"seed": 4}, ini={"set": ["seed=5"]}) == (5, None)
    assert _resolved(sweep, ini={"set": ["seed=5"]}) == (5, "seed5")
    assert _resolved(overrides={"seed": 4}, ini={"sweep": ["seed=6"]}) == (6, "seed6")
    assert _resolved(sweep, ini={"sweep": ["seed=6"]}, cli={"set": ["seed=7"]}) == (7, "seed7")
    assert _resolved(sweep, ini={"set": ["seed=5"]}, cli={"sweep": ["seed=8"]}) == (8, "seed8")
    with pytest.raises(ConfigurationError, match=r"llem.run\(seed=4\) conflicts with the swept"):
        _resolved(sweep, overrides={"seed": 4})
    with pytest.raises(ConfigurationError, match="--llem-set and --llem-sweep both set seed"):
        _resolved(cli={"set": ["seed=7"], "sweep": ["seed=8,9"]})


def test_a_preset_over_a_swept_sampling_field_cannot_hide_behind_the_id():
    from pathlib import Path
    from types import SimpleNamespace

    from pytest_llem.collection import resolve_for, sweep_cases, sweep_conflict, sweep_mismatch
    from pytest_llem.options import build_options

    session: Any = SimpleNamespace(options=build_options(cli={}, ini={}, invocation_dir=Path()))
    node = _Node(pytest.mark.llem_sweep(temperature=[0.5]))
    (case,) = sweep_cases(node, session)  # type: ignore[arg-type]
    plain = resolve_for(node, session, {}, case)
    assert sweep_mismatch(plain, case) is None
    overrides = {"sampling": "creative"}  # a preset replaces the sampling fields below it
    assert sweep_conflict(overrides, case) is None
    preset = resolve_for(node, session, overrides, case)
    assert sweep_mismatch(preset, case) == (
        f"the test id names sampling.temperature=0.5 but sampling.temperature="
        f"{preset.sampling.temperature!r} would run: a setting above the sweep replaces it"
    )
