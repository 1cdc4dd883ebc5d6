"""bitsandbytes quantization of the transformers backend: the settings, their mapping to
``BitsAndBytesConfig`` and the skip where bitsandbytes cannot run (it is not installed here)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_llem.backends.transformers import (
    BITSANDBYTES_MIN_VERSION,
    TransformersBackend,
    quantization_kwargs,
)
from pytest_llem.config.introspection import parameter
from pytest_llem.config.models import CaseConfig, TransformersConfig
from pytest_llem.config.resolve import check_value, resolve_case
from pytest_llem.exceptions import BackendConfigError, BackendNotAvailableError, ConfigurationError
from pytest_llem.harness.case import is_skip_error as _is_missing_hardware_or_engine

pytest_plugins = ["pytester"]


def test_quantization_settings_are_load_parameters_of_the_transformers_backend():
    quant = parameter("transformers.quantization")
    assert quant.choices == ("none", "bnb-8bit", "bnb-4bit")
    assert quant.default == "none"
    assert quant.reload is True
    assert quant.backends == ("transformers",)
    assert parameter("transformers.bnb_4bit_quant_type").choices == ("nf4", "fp4")
    assert parameter("transformers.bnb_4bit_use_double_quant").reload is True
    with pytest.raises(ConfigurationError, match=r"transformers\.quantization"):
        check_value("transformers.quantization", "gptq")


def test_bnb_4bit_options_need_bnb_4bit():
    case = resolve_case(
        [{"transformers": {"quantization": "bnb-4bit", "bnb_4bit_quant_type": "fp4"}}]
    )
    assert case.transformers.bnb_4bit_quant_type == "fp4"
    with pytest.raises(ConfigurationError, match=r"apply only with transformers\.quantization"):
        resolve_case([{"transformers": {"quantization": "bnb-8bit", "bnb_4bit_quant_type": "fp4"}}])
    with pytest.raises(ConfigurationError, match="apply only with"):
        resolve_case([{"transformers": {"bnb_4bit_use_double_quant": True}}])


@pytest.mark.parametrize(
    ("options", "dtype", "expected"),
    [
        ({}, "float32", None),
        ({"quantization": "bnb-8bit"}, "bfloat16", {"load_in_8bit": True}),
        (
            {"quantization": "bnb-4bit"},
            "bfloat16",
            {
                "load_in_4bit": True,
                "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": False,
            },
        ),
        (
            {
                "quantization": "bnb-4bit",
                "bnb_4bit_compute_dtype": "float16",
                "bnb_4bit_quant_type": "fp4",
                "bnb_4bit_use_double_quant": True,
            },
            "float32",
            {
                "load_in_4bit": True,
                "bnb_4bit_compute_dtype": "float16",
                "bnb_4bit_quant_type": "fp4",
                "bnb_4bit_use_double_quant": True,
            },
        ),
    ],
)
def test_quantization_maps_to_bitsandbytes_config_arguments(options, dtype, expected):
    kwargs = quantization_kwargs(TransformersConfig(**options), dtype=dtype)
    assert kwargs == expected
    if kwargs is None:
        return
    transformers = pytest.importorskip("transformers")
    config = transformers.BitsAndBytesConfig(**kwargs)  # needs no bitsandbytes to build
    assert config.quantization_method() in ("llm_int8", "fp4", "nf4")
    if "bnb_4bit_compute_dtype" in kwargs:
        assert str(config.bnb_4bit_compute_dtype) == f"torch.{kwargs['bnb_4bit_compute_dtype']}"
        assert config.bnb_4bit_quant_type == kwargs["bnb_4bit_quant_type"]


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here"
)
@pytest.mark.parametrize("quantization", ["bnb-8bit", "bnb-4bit"])
def test_without_bitsandbytes_the_case_skips_with_the_install_hint(tiny_model, quantization):
    pytest.importorskip("transformers")
    case = CaseConfig(
        model=str(tiny_model), device="cpu", transformers={"quantization": quantization}
    )
    with pytest.raises(BackendNotAvailableError) as raised:
        TransformersBackend(case).load()
    message = str(raised.value)
    assert f"transformers.quantization={quantization}" in message
    assert "bitsandbytes is not installed" in message
    assert f"bitsandbytes>={BITSANDBYTES_MIN_VERSION}" in message
    assert _is_missing_hardware_or_engine(raised.value)


@pytest.fixture
def fake_bitsandbytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable ``bitsandbytes`` (and ``accelerate``) with package metadata, on sys.path.

    transformers is imported first, so it never sees the fake ``accelerate``.
    """
    pytest.importorskip("transformers")
    for name in ("bitsandbytes", "accelerate"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("bitsandbytes", None)
    importlib.invalidate_caches()


def _install(root: Path, version: str, devices: str) -> None:
    dist = root / f"bitsandbytes-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: {version}\n"
    )
    (root / "bitsandbytes" / "__init__.py").write_text(f"supported_torch_devices = {devices}\n")
    importlib.invalidate_caches()


def test_a_bitsandbytes_without_cpu_kernels_skips_on_cpu(fake_bitsandbytes, tiny_model):
    pytest.importorskip("transformers")
    _install(fake_bitsandbytes, "0.47.0", "{'cuda'}")
    case = CaseConfig(
        model=str(tiny_model), device="cpu", transformers={"quantization": "bnb-8bit"}
    )
    with pytest.raises(BackendConfigError, match="cannot quantize on device=cpu") as raised:
        TransformersBackend(case).load()
    assert raised.value.param == "device"
    assert "0.47.0" in str(raised.value)
    assert _is_missing_hardware_or_engine(raised.value)


def test_a_too_old_bitsandbytes_skips_with_the_upgrade_hint(fake_bitsandbytes, tiny_model):
    pytest.importorskip("transformers")
    _install(fake_bitsandbytes, "0.43.1", "{'cpu', 'cuda'}")
    case = CaseConfig(
        model=str(tiny_model), device="cpu", transformers={"quantization": "bnb-4bit"}
    )
    with pytest.raises(BackendNotAvailableError, match=r"bitsandbytes 0\.43\.1 is too old"):
        TransformersBackend(case).load()


SWEEP = """
import pytest

@pytest.mark.llem(max_new_tokens=2, min_new_tokens=2, num_prompts=1)
def test_quant(llem):
    llem.run()
"""


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here"
)
def test_a_sweep_over_quantization_collects_and_skips_what_cannot_run(
    pytester: pytest.Pytester, tiny_model
):
    pytester.makepyfile(SWEEP)
    sweep = "--llem-sweep=transformers.quantization=auto"
    collected = pytester.runpytest("--collect-only", "-q", sweep)
    collected.stdout.fnmatch_lines(
        ["*test_quant?none?", "*test_quant?bnb-8bit?", "*test_quant?bnb-4bit?"]
    )
    quick = ["--llem-warmup=0", "--llem-repeat=1", "--llem-meter=none", "-p", "no:cacheprovider"]
    result = pytester.runpytest(*quick, "--llem-device=cpu", sweep, "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*SKIPPED*bitsandbytes is not installed*"])
