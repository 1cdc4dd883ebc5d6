"""bitsandbytes quantization of the transformers backend (``transformers.quantization``).

What ``BitsAndBytesConfig`` is given for each setting, what the run record says about it, and
the check that bitsandbytes is installed, recent enough and has kernels for the device, so a
case that cannot be quantized here skips with the reason before anything is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from typing import Any

from pytest_llem.backends.support import first_line
from pytest_llem.config.models import TransformersConfig
from pytest_llem.exceptions import BackendConfigError, BackendNotAvailableError

__all__ = [
    "BITSANDBYTES_MIN_VERSION",
    "check_bitsandbytes",
    "describe_quantization",
    "quantization_kwargs",
]

_NAME = "transformers"
#: The oldest bitsandbytes that transformers' quantizers accept.
BITSANDBYTES_MIN_VERSION = "0.46.1"


def quantization_kwargs(options: TransformersConfig, *, dtype: str) -> dict[str, Any] | None:
    """Keyword arguments of ``transformers.BitsAndBytesConfig`` for ``transformers.quantization``.

    Args:
        options: The case's ``transformers.*`` settings.
        dtype: The model's resolved dtype name (``float32``, ``bfloat16``, ...), the compute
            dtype of 4-bit layers when ``bnb_4bit_compute_dtype`` is ``auto``.

    Returns:
        None for ``quantization="none"``, otherwise the arguments.
    """
    if options.quantization == "none":
        return None
    if options.quantization == "bnb-8bit":
        return {"load_in_8bit": True}
    compute = options.bnb_4bit_compute_dtype
    return {
        "load_in_4bit": True,
        "bnb_4bit_compute_dtype": dtype if compute == "auto" else compute,
        "bnb_4bit_quant_type": options.bnb_4bit_quant_type,
        "bnb_4bit_use_double_quant": options.bnb_4bit_use_double_quant,
    }


def describe_quantization(options: TransformersConfig, *, dtype: str) -> str:
    """A short description of the quantization for the run record (``dtype`` as resolved)."""
    kwargs = quantization_kwargs(options, dtype=dtype) or {}
    if options.quantization == "bnb-8bit":
        return "bitsandbytes LLM.int8() (8-bit weights)"
    double = ", double quant" if kwargs.get("bnb_4bit_use_double_quant") else ""
    return (
        f"bitsandbytes 4-bit {kwargs.get('bnb_4bit_quant_type')} "
        f"(compute {kwargs.get('bnb_4bit_compute_dtype')}{double})"
    )


def check_bitsandbytes(quantization: str, device: str) -> str:
    """Check that bitsandbytes can quantize on ``device``; returns its version.

    Raises:
        BackendNotAvailableError: bitsandbytes (or accelerate, which transformers needs for
            it) is not installed, is older than transformers accepts, or fails to import.
        BackendConfigError: (``param="device"``) this bitsandbytes has no kernels for
            ``device``; both make the case skip with the reason.
    """
    label = f"{_NAME} with transformers.quantization={quantization}"
    hint = f"pip install 'bitsandbytes>={BITSANDBYTES_MIN_VERSION}' accelerate"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendNotAvailableError(label, f"{hint} (bitsandbytes is not installed)")
    if importlib.util.find_spec("accelerate") is None:
        raise BackendNotAvailableError(label, f"{hint} (accelerate is not installed)")
    from importlib.metadata import version as installed_version

    version = installed_version("bitsandbytes")
    if _release(version) < _release(BITSANDBYTES_MIN_VERSION):
        raise BackendNotAvailableError(label, f"{hint} (bitsandbytes {version} is too old)")
    try:
        bnb = importlib.import_module("bitsandbytes")
    except Exception as e:
        raise BackendNotAvailableError(
            label, f"{hint} (importing bitsandbytes {version} failed: {first_line(e)})"
        ) from e
    # Releases without the multi-backend device list have CUDA kernels only.
    supported = set(getattr(bnb, "supported_torch_devices", None) or {"cuda"})
    if device not in supported:
        raise BackendConfigError(
            _NAME,
            "device",
            f"bitsandbytes {version} cannot quantize on device={device} (it supports: "
            f"{', '.join(sorted(supported))}); recent releases also run on x86-64 CPUs with "
            "AVX2 (see the bitsandbytes installation guide)",
        )
    return version


def _release(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", version.split("+")[0])[:3]
    return tuple(int(p) for p in parts)
