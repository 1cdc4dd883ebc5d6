"""The one error hierarchy of pytest-llem.

Every error the plugin raises on purpose derives from :class:`LlemError`. The plugin turns these
into what a pytest user expects: a usage error for a bad option, a collection error for a bad
marker, a skip for missing hardware or engines, and a short failure otherwise.
"""

from __future__ import annotations

__all__ = [
    "BackendConfigError",
    "BackendError",
    "BackendInferenceError",
    "BackendInitializationError",
    "BackendNotAvailableError",
    "BackendTimeoutError",
    "ConfigurationError",
    "EnergyMeterError",
    "GateError",
    "GpuNotIsolatedError",
    "InferenceError",
    "LlemError",
    "MeterUnavailableError",
    "ModelLoadError",
    "NotEnoughGpusError",
    "ResultStoreError",
    "RetryableError",
]


class LlemError(Exception):
    """Base class of every error pytest-llem raises on purpose."""


class ConfigurationError(LlemError):
    """A parameter, option or marker value is invalid."""


class ModelLoadError(LlemError):
    """A model could not be found or loaded."""


class InferenceError(LlemError):
    """Generation failed while a workload ran."""


class EnergyMeterError(LlemError):
    """An energy meter failed while measuring."""


class MeterUnavailableError(EnergyMeterError):
    """A meter cannot measure on this machine (no GPU, no counters, package missing)."""

    def __init__(self, meter: str, reason: str) -> None:
        super().__init__(f"energy meter '{meter}' is unavailable: {reason}")
        self.meter = meter
        self.reason = reason


class BackendError(LlemError):
    """Base class of errors raised by an inference backend."""


class BackendNotAvailableError(BackendError):
    """The engine behind a backend is not installed."""

    def __init__(self, backend: str, install_hint: str) -> None:
        super().__init__(f"backend '{backend}' is not available; install it with: {install_hint}")
        self.backend = backend
        self.install_hint = install_hint


class BackendInitializationError(BackendError):
    """The engine is installed but could not be started."""


class BackendInferenceError(BackendError, InferenceError):
    """The engine failed while generating."""


class BackendTimeoutError(BackendError):
    """The engine did not answer in time."""


class BackendConfigError(BackendError, ConfigurationError):
    """A backend parameter is invalid for this engine or device."""

    def __init__(self, backend: str, param: str, message: str) -> None:
        super().__init__(f"{backend}: {param}: {message}")
        self.backend = backend
        self.param = param


class GpuNotIsolatedError(EnergyMeterError):
    """Other processes run on a measured GPU, or its processes cannot be listed, and
    ``--llem-isolation`` says skip or fail.

    ``isolation`` is the :class:`~pytest_llem.results.models.IsolationRecord` of what was seen.
    """

    def __init__(self, message: str, *, isolation: object) -> None:
        super().__init__(message)
        self.isolation = isolation


class NotEnoughGpusError(BackendConfigError):
    """A case needs more GPUs (tensor x pipeline parallel) than this process can see."""


class RetryableError(LlemError):
    """A transient fault (such as running out of memory) that may pass on a retry."""

    def __init__(self, message: str, *, max_retries: int = 1) -> None:
        super().__init__(message)
        self.max_retries = max_retries


class ResultStoreError(LlemError):
    """A run record could not be written or read."""


class GateError(LlemError):
    """A regression gate or budget expression is invalid."""
