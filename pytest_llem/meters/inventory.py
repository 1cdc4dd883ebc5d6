"""The device inventory: the GPUs this process can see, as the run record describes them.

One place lists GPUs for everyone who needs to know them: the run record's machine section and
its reproducibility manifest (driver, CUDA, power limits, clocks, ECC, MIG, persistence),
``auto`` meter selection, GPU-count checks and the ``gpu`` test marker. It asks NVML, answers
:class:`~pytest_llem.results.models.GpuInfo` and
:class:`~pytest_llem.results.models.GpuManifest` records in SI-style units (W, MHz), and never
raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pytest_llem.exceptions import MeterUnavailableError
from pytest_llem.meters.nvml_devices import (
    VisibleGpu,
    cuda_driver_version,
    driver_version,
    import_pynvml,
    init_failure_reason,
    memory_total_mb,
    nvml_text,
    power_limit_w,
    setting_query,
    visible_gpus,
)
from pytest_llem.results.models import GpuInfo, GpuManifest

__all__ = ["DeviceManifest", "device_manifest", "gpu_inventory"]

logger = logging.getLogger("pytest_llem")

_T = TypeVar("_T")


def _with_nvml(describe: Callable[[Any], _T]) -> tuple[_T | None, str | None]:
    """``describe(pynvml)`` between ``nvmlInit`` and ``nvmlShutdown``, or None and the reason
    NVML could not answer."""
    try:
        pynvml = import_pynvml()
    except MeterUnavailableError as e:
        return None, e.reason
    try:
        pynvml.nvmlInit()
    except Exception as e:  # any failure here means "no GPU information", never a crash
        return None, init_failure_reason(pynvml, e)
    try:
        return describe(pynvml), None
    except MeterUnavailableError as e:
        return None, e.reason
    except Exception as e:
        return None, f"NVML failed while listing GPUs: {e}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            logger.debug("nvmlShutdown failed after listing GPUs", exc_info=True)


def gpu_inventory() -> tuple[list[GpuInfo], str | None]:
    """Describe the GPUs this process can see, for the run record's machine section.

    Never raises: where NVML cannot answer, the list is empty and the reason says why. A MIG
    instance named in ``CUDA_VISIBLE_DEVICES`` is described by its parent GPU. ``index`` is
    the index the process sees (after ``CUDA_VISIBLE_DEVICES``); memory is in MiB.

    Returns:
        The visible GPUs (respecting ``CUDA_VISIBLE_DEVICES``) and None, or ``[]`` and a reason.
    """

    def describe(pynvml: Any) -> list[GpuInfo]:
        driver = driver_version(pynvml)
        gpus: list[GpuInfo] = []
        for index, visible in enumerate(visible_gpus(pynvml)):
            handle = pynvml.nvmlDeviceGetHandleByIndex(visible.nvml_index)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=nvml_text(pynvml.nvmlDeviceGetName(handle)),
                    uuid=nvml_text(pynvml.nvmlDeviceGetUUID(handle)),
                    driver=driver,
                    power_limit_w=power_limit_w(pynvml, handle),
                    memory_total_mb=memory_total_mb(pynvml, handle),
                )
            )
        return gpus

    gpus, note = _with_nvml(describe)
    return (gpus, None) if gpus is not None else ([], note)


@dataclass(frozen=True)
class DeviceManifest:
    """The driver, its CUDA version and every visible GPU's settings, or why there are none."""

    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[GpuManifest] = field(default_factory=list)
    note: str | None = None


def _enabled(pynvml: Any, mode: Any) -> bool:
    """An ``NVML_FEATURE_*`` or ``NVML_DEVICE_MIG_*`` answer as a bool (``[current, pending]``
    pairs by their current mode)."""
    current = mode[0] if isinstance(mode, list | tuple) else mode
    return int(current) == int(getattr(pynvml, "NVML_FEATURE_ENABLED", 1))


def _gpu_settings(pynvml: Any, index: int, visible: VisibleGpu) -> GpuManifest:
    """One GPU's settings (a MIG instance's are its parent GPU's); units converted here: NVML
    gives power limits in mW and clocks in MHz."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(visible.nvml_index)
    unknown: dict[str, str] = {}

    def ask(name: str, query: Callable[[], Any], convert: Callable[[Any], Any]) -> Any:
        value, why = setting_query(pynvml, query)
        if why is not None:
            unknown[name] = why
            return None
        return convert(value)

    def milliwatts(value: Any) -> float:
        return float(value) / 1000.0

    def enabled(value: Any) -> bool:
        return _enabled(pynvml, value)

    def clock(kind: int) -> Callable[[], Any]:
        return lambda: pynvml.nvmlDeviceGetApplicationsClock(handle, kind)

    settings = {
        "power_limit_w": ask(
            "power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle), milliwatts
        ),
        "default_power_limit_w": ask(
            "default_power_limit_w",
            lambda: pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle),
            milliwatts,
        ),
        "persistence_mode": ask(
            "persistence_mode", lambda: pynvml.nvmlDeviceGetPersistenceMode(handle), enabled
        ),
        "ecc_enabled": ask("ecc_enabled", lambda: pynvml.nvmlDeviceGetEccMode(handle), enabled),
        "mig_enabled": ask("mig_enabled", lambda: pynvml.nvmlDeviceGetMigMode(handle), enabled),
        "application_sm_clock_mhz": ask(
            "application_sm_clock_mhz", clock(pynvml.NVML_CLOCK_SM), float
        ),
        "application_memory_clock_mhz": ask(
            "application_memory_clock_mhz", clock(pynvml.NVML_CLOCK_MEM), float
        ),
    }
    return GpuManifest(
        index=index,
        name=nvml_text(pynvml.nvmlDeviceGetName(handle)),
        uuid=nvml_text(pynvml.nvmlDeviceGetUUID(handle)),
        unknown=unknown,
        **settings,
    )


def device_manifest() -> DeviceManifest:
    """The driver, the CUDA version it supports and each visible GPU's settings that change
    its energy (power limit, application clocks, ECC, MIG, persistence mode), for the run
    record's manifest.

    Never raises: where NVML cannot answer at all, ``note`` says why; a single setting it
    cannot give is None with the reason in that GPU's ``unknown``.
    """

    def describe(pynvml: Any) -> DeviceManifest:
        return DeviceManifest(
            driver_version=driver_version(pynvml),
            cuda_driver_version=cuda_driver_version(pynvml),
            gpus=[
                _gpu_settings(pynvml, index, visible)
                for index, visible in enumerate(visible_gpus(pynvml))
            ],
        )

    found, note = _with_nvml(describe)
    return found if found is not None else DeviceManifest(note=note)
