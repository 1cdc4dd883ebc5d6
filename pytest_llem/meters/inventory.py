"""The device inventory: the GPUs this process can see, as the run record describes them.

One place lists GPUs for everyone who needs to know them: the run record's machine section,
``auto`` meter selection, GPU-count checks and the ``gpu`` test marker. It asks NVML, answers
:class:`~pytest_llem.results.models.GpuInfo` records, and never raises.
"""

from __future__ import annotations

import logging

from pytest_llem.exceptions import MeterUnavailableError
from pytest_llem.meters.nvml_devices import (
    driver_version,
    import_pynvml,
    init_failure_reason,
    memory_total_mb,
    nvml_text,
    power_limit_w,
    visible_gpus,
)
from pytest_llem.results.models import GpuInfo

__all__ = ["gpu_inventory"]

logger = logging.getLogger("pytest_llem")


def gpu_inventory() -> tuple[list[GpuInfo], str | None]:
    """Describe the GPUs this process can see, for the run record's machine section.

    Never raises: where NVML cannot answer, the list is empty and the reason says why. A MIG
    instance named in ``CUDA_VISIBLE_DEVICES`` is described by its parent GPU. ``index`` is
    the index the process sees (after ``CUDA_VISIBLE_DEVICES``); memory is in MiB.

    Returns:
        The visible GPUs (respecting ``CUDA_VISIBLE_DEVICES``) and None, or ``[]`` and a reason.
    """
    try:
        pynvml = import_pynvml()
    except MeterUnavailableError as e:
        return [], e.reason
    try:
        pynvml.nvmlInit()
    except Exception as e:  # any failure here means "no GPU information", never a crash
        return [], init_failure_reason(pynvml, e)
    try:
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
        return gpus, None
    except MeterUnavailableError as e:
        return [], e.reason
    except Exception as e:
        return [], f"NVML failed while listing GPUs: {e}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            logger.debug("nvmlShutdown failed after listing GPUs", exc_info=True)
