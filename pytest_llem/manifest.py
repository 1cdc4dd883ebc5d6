"""The run record's reproducibility manifest: what a run needs to be reproduced, and what
changes its energy when it differs (driver, CUDA, GPU power limit and clocks, ECC, MIG,
persistence mode, container image, Python environment, commit, profile).

Collected once when the session ends, next to the machine section (:mod:`pytest_llem.machine`);
the GPU settings come from NVML through :func:`pytest_llem.meters.inventory.device_manifest`.
Nothing here fails a run, and nothing is guessed: a fact that cannot be read is None, with the
reason where there is one. A container's image digest in particular is only what the user gives
in ``LLEM_CONTAINER_IMAGE``, because a process in a container cannot see its image's digest.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from pytest_llem.machine import git_state
from pytest_llem.results.models import (
    ContainerInfo,
    MachineInfo,
    PythonEnvironment,
    RunManifest,
)

__all__ = [
    "CONTAINER_IMAGE_ENV",
    "container_info",
    "packages_digest",
    "python_environment",
    "this_manifest",
]

#: The variable that names the container image a run is in: ``IMAGE@sha256:<64 hex>`` (or a
#: bare ``sha256:<64 hex>``) pins it; a reference without a digest names it only.
CONTAINER_IMAGE_ENV = "LLEM_CONTAINER_IMAGE"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_NO_DIGEST_HINT = (
    f"set {CONTAINER_IMAGE_ENV}=IMAGE@sha256:<digest> (docker inspect --format "
    "'{{index .RepoDigests 0}}' IMAGE prints it) to pin the image"
)


def _normalised(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Tensorrt_LLM`` -> ``tensorrt-llm``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def packages_digest(packages: Mapping[str, str]) -> str:
    """``sha256:<hex>`` of the ``name==version`` lines, sorted, joined by newlines (no final
    newline): the same list gives the same digest on any machine."""
    lines = sorted(f"{name}=={version}" for name, version in packages.items())
    return "sha256:" + hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def python_environment() -> PythonEnvironment:
    """Every distribution installed in this Python (the first found of a name, as importing
    finds it), by normalised name, with the digest of the list."""
    packages: dict[str, str] = {}
    for dist in metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version:
            packages.setdefault(_normalised(name), version)
    ordered = dict(sorted(packages.items()))
    return PythonEnvironment(
        version=sys.version.split()[0],
        implementation=platform.python_implementation(),
        packages=ordered,
        packages_digest=packages_digest(ordered),
    )


def _given_image(value: str) -> tuple[str | None, str | None, str | None]:
    """``(image, digest, note)`` from ``LLEM_CONTAINER_IMAGE``."""
    image, _, digest = value.rpartition("@") if "@" in value else (value, "", "")
    if not digest and _DIGEST.fullmatch(value.lower()):
        return None, value.lower(), None
    if not digest:
        return value, None, f"{CONTAINER_IMAGE_ENV} names no digest: {_NO_DIGEST_HINT}"
    if not _DIGEST.fullmatch(digest.lower()):
        return image or None, None, f"{CONTAINER_IMAGE_ENV}: {digest!r} is not sha256:<64 hex>"
    return image or None, digest.lower(), None


def _containerenv_image(path: Path) -> str | None:
    """The ``image="..."`` podman writes into ``/run/.containerenv`` (when it writes any)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.search(r'^image="([^"]*)"', text, flags=re.MULTILINE)
    if found is None or not found.group(1):
        return None
    return found.group(1)


def container_info(
    *, filesystem_root: Path = Path("/"), environ: Mapping[str, str] | None = None
) -> ContainerInfo:
    """Whether this process runs in a container and which image, as far as can be known.

    Markers: ``/.dockerenv`` (Docker), ``/run/.containerenv`` (Podman, which may name the image
    there), ``KUBERNETES_SERVICE_HOST`` (a Kubernetes pod), the ``container`` variable (set by
    systemd-nspawn, Podman, LXC). The image digest comes only from ``LLEM_CONTAINER_IMAGE``.

    Args:
        filesystem_root: Where to look for the marker files (tests point it elsewhere).
        environ: The environment (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    evidence: list[str] = []
    runtimes: list[str] = []
    image: str | None = None
    if (filesystem_root / ".dockerenv").exists():
        evidence.append("/.dockerenv exists")
        runtimes.append("docker")
    containerenv = filesystem_root / "run" / ".containerenv"
    if containerenv.exists():
        evidence.append("/run/.containerenv exists")
        runtimes.append("podman")
        image = _containerenv_image(containerenv)
    if env.get("KUBERNETES_SERVICE_HOST"):
        evidence.append("KUBERNETES_SERVICE_HOST is set")
        runtimes.append("kubernetes")
    if env.get("container"):
        evidence.append(f"container={env['container']}")
        runtimes.append(env["container"])
    digest, note = None, None
    given = env.get(CONTAINER_IMAGE_ENV, "").strip()
    if given:
        evidence.append(f"{CONTAINER_IMAGE_ENV} is set")
        given_image, digest, note = _given_image(given)
        image = given_image or image
    elif evidence:
        note = f"in a container of unknown image digest: {_NO_DIGEST_HINT}"
    return ContainerInfo(
        detected=bool(evidence),
        runtime=runtimes[0] if runtimes else None,
        evidence=evidence,
        image=image,
        image_digest=digest,
        note=note,
    )


def _cuda_runtime_version() -> str | None:
    """The CUDA version of the torch this run loaded (never imported here: heavy)."""
    torch = sys.modules.get("torch")
    version = getattr(getattr(torch, "version", None), "cuda", None)
    return version if isinstance(version, str) else None


def this_manifest(
    root: Path, *, machine: MachineInfo | None = None, profile: str | None = None
) -> RunManifest:
    """The manifest of a run ending now on this machine.

    Args:
        root: The project's root folder, whose git commit the manifest names.
        machine: The run's machine section, whose commit is taken rather than asking git again.
        profile: The workload profile that ran (None: not known here).
    """
    from pytest_llem.meters.inventory import device_manifest

    devices = device_manifest()
    commit, dirty = (machine.git_commit, machine.git_dirty) if machine else git_state(root)
    return RunManifest(
        driver_version=devices.driver_version,
        cuda_driver_version=devices.cuda_driver_version,
        cuda_runtime_version=_cuda_runtime_version(),
        gpus=devices.gpus,
        gpu_note=devices.note,
        container=container_info(),
        python=python_environment(),
        git_commit=commit,
        git_dirty=dirty,
        profile=profile,
    )
