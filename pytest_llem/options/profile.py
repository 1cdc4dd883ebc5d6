"""Which workload profile a run uses, and why (``--llem-profile``, ini ``llem_profile``).

``auto`` (the default) picks ``standard`` when the run will use a CUDA GPU and ``smoke``
otherwise, decided at start-up without importing torch or initialising NVML:

1. a device set on the command line or in the ini file (``--llem-device``, ``--llem-set
   device=...``; the command line first) decides: ``cpu`` means ``smoke``, ``cuda`` means
   ``standard``;
2. ``CUDA_VISIBLE_DEVICES`` set to nothing or ``-1`` hides every GPU: ``smoke``;
3. an NVIDIA device file (``/dev/nvidia0``, ``/dev/nvidia1``, ...) means a CUDA GPU:
   ``standard``;
4. otherwise ``smoke``.

A GPU behind an ``endpoint`` server, or one the device files do not show (WSL), is not seen:
name the profile there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_llem.results.models import ProfileRecord

__all__ = ["DEVICE_FILES", "choose_profile"]

#: Where NVIDIA's driver puts one device file per GPU.
DEVICE_FILES = Path("/dev")


def choose_profile(
    requested: str | None,
    origin: str,
    *,
    layers: tuple[Mapping[str, Any], ...] = (),
    device_files: Path = DEVICE_FILES,
    environ: Mapping[str, str] | None = None,
) -> ProfileRecord:
    """The profile of a run and the reason it was chosen.

    Args:
        requested: ``smoke``, ``standard``, ``full`` or ``auto`` (None: ``auto``).
        origin: How a message names where ``requested`` came from (``--llem-profile``, ...).
        layers: The case parameters the command line and the ini file set (a ``device``
            there decides ``auto``).
        device_files: The folder holding ``nvidia<N>`` device files.
        environ: The environment (default: this process's).
    """
    if requested not in (None, "auto"):
        return ProfileRecord(name=requested, reason=f"{origin}={requested}")
    env = os.environ if environ is None else environ
    for layer in layers:  # the command line's layer first: it wins
        device = layer.get("device")
        if device in ("cpu", "cuda"):
            name = "smoke" if device == "cpu" else "standard"
            return ProfileRecord(name=name, reason=f"auto: device={device} was asked for")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return ProfileRecord(
            name="smoke", reason=f"auto: CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
        )
    gpus = sorted(
        path.name
        for path in _listing(device_files)
        if path.name.startswith("nvidia") and path.name[6:].isdigit()
    )
    if gpus:
        return ProfileRecord(
            name="standard", reason=f"auto: a CUDA GPU is present ({device_files / gpus[0]})"
        )
    return ProfileRecord(name="smoke", reason=f"auto: no CUDA GPU ({device_files}/nvidia* absent)")


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []
