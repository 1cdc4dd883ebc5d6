"""The parts of a run record that say how it can be reproduced and which share of a session it
holds: the reproducibility manifest (driver, CUDA, GPU settings, container, Python environment,
commit, profile) and the shard manifest of ``--llem-shard``. Re-exported by
:mod:`pytest_llem.results.models`, whose ``RunRecord`` holds them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ContainerInfo",
    "GpuManifest",
    "PartialRecord",
    "PythonEnvironment",
    "RunManifest",
    "ShardManifest",
]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuManifest(_Record):
    """One GPU's settings that change what it draws, read from NVML when the run ended.

    A value NVML could not give is None and ``unknown`` says why, field by field.
    """

    index: int = Field(description="The index this process sees (after CUDA_VISIBLE_DEVICES).")
    name: str
    uuid: str | None = None
    power_limit_w: float | None = Field(
        default=None, description="Enforced power limit, W (nvmlDeviceGetEnforcedPowerLimit)."
    )
    default_power_limit_w: float | None = Field(
        default=None,
        description="The board's default power limit, W "
        "(nvmlDeviceGetPowerManagementDefaultLimit).",
    )
    persistence_mode: bool | None = Field(
        default=None, description="Driver persistence mode on (nvmlDeviceGetPersistenceMode)."
    )
    ecc_enabled: bool | None = Field(
        default=None, description="ECC memory on, current mode (nvmlDeviceGetEccMode)."
    )
    mig_enabled: bool | None = Field(
        default=None, description="MIG mode on, current mode (nvmlDeviceGetMigMode)."
    )
    application_sm_clock_mhz: float | None = Field(
        default=None, description="Application SM clock, MHz (nvmlDeviceGetApplicationsClock)."
    )
    application_memory_clock_mhz: float | None = Field(
        default=None, description="Application memory clock, MHz (nvmlDeviceGetApplicationsClock)."
    )
    unknown: dict[str, str] = Field(
        default_factory=dict, description="Field -> why NVML could not give it."
    )


class ContainerInfo(_Record):
    """Whether the run was in a container, and which image, as far as it can be known.

    The image and its digest come only from ``LLEM_CONTAINER_IMAGE`` (a container cannot see
    the digest of its own image); a digest is never guessed.
    """

    detected: bool = Field(description="A container runtime's marker was found (see evidence).")
    runtime: str | None = Field(default=None, description="docker, podman, kubernetes, ...")
    evidence: list[str] = Field(default_factory=list, description="What the detection saw.")
    image: str | None = Field(default=None, description="The image reference the user gave.")
    image_digest: str | None = Field(
        default=None, description="sha256:<64 hex> from LLEM_CONTAINER_IMAGE, else None."
    )
    note: str | None = None


class PythonEnvironment(_Record):
    """The Python environment: every installed distribution and a digest of the list."""

    version: str
    implementation: str
    packages: dict[str, str] = Field(
        default_factory=dict, description="Normalised distribution name -> version, sorted."
    )
    packages_digest: str = Field(
        description="sha256:<hex> of the sorted name==version lines joined by newlines."
    )


class RunManifest(_Record):
    """What a run needs to be reproduced: driver, CUDA, GPU settings, container, Python
    environment, commit and profile, collected when the run ended."""

    driver_version: str | None = Field(default=None, description="NVIDIA driver (NVML).")
    cuda_driver_version: str | None = Field(
        default=None,
        description="The CUDA version the driver supports (nvmlSystemGetCudaDriverVersion).",
    )
    cuda_runtime_version: str | None = Field(
        default=None,
        description="The CUDA version the loaded torch was built with (None: torch not loaded "
        "or a CPU build).",
    )
    gpus: list[GpuManifest] = Field(default_factory=list)
    gpu_note: str | None = Field(default=None, description="Why there are no GPUs, if none.")
    container: ContainerInfo
    python: PythonEnvironment
    git_commit: str | None = None
    git_dirty: bool | None = None
    profile: str | None = Field(default=None, description="The workload profile that ran.")


class ShardManifest(_Record):
    """Which share of a sharded session (``--llem-shard=K/N``) a run record holds."""

    index: int = Field(description="K: this shard, counted from 1.")
    count: int = Field(description="N: how many shards the session has.")
    assignment_digest: str = Field(
        description="SHA-256 of every case's shard; equal on every shard of one session."
    )
    collection_digest: str = Field(
        description="SHA-256 of every llem case id of the session (all shards), sorted."
    )
    collection_size: int = Field(description="llem cases in the whole session.")
    ids: list[str] = Field(default_factory=list, description="llem case ids assigned here.")
    groups: int = Field(default=0, description="Model-load groups assigned here.")
    commit: str | None = Field(default=None, description="The git commit the shard ran.")
    machine: str = Field(description="The machine id (as saved runs name it) of the shard.")
    costs: str = Field(
        default="estimate",
        description="What balanced the shards: 'estimate' or the saved runs' files.",
    )

    @property
    def label(self) -> str:
        """``K/N``."""
        return f"{self.index}/{self.count}"


class PartialRecord(_Record):
    """Why a merged record of shards is incomplete (``llem merge --allow-partial``)."""

    missing_shards: list[str] = Field(description="The shards not merged, as K/N.")
    expected_cases: int = Field(description="llem cases in the whole session.")
    present_cases: int = Field(description="llem cases assigned to the merged shards.")
