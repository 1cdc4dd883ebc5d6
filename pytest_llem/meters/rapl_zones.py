"""RAPL zone discovery: which powercap zones the RAPL meter adds up, and reading their counters.

Package zones (``package-N``, ``package-N-die-M``) give the ``cpu`` domain and their ``dram``
subzones the ``dram`` domain; ``core``/``uncore`` (inside their package), ``psys`` (the whole
platform) and ``intel-rapl-mmio`` zones are left out, each with the reason. On AMD and Hygon
CPUs the package counter is per socket, so repeated per-die zones are dropped. A counter file
being rewritten may read empty or partial: reads are retried a few times before failing.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_llem.exceptions import EnergyMeterError, MeterUnavailableError
from pytest_llem.meters.base import Domain

__all__ = [
    "DEFAULT_ROOT",
    "ROOT_ENV_VAR",
    "RaplZone",
    "check_readable",
    "drop_repeated_dies",
    "rapl_root",
    "rapl_unavailable_reason",
    "rapl_zones",
    "read_cpu_vendor",
    "read_uj",
]

#: Environment variable naming the powercap folder (for containers and tests).
ROOT_ENV_VAR = "LLEM_RAPL_ROOT"
DEFAULT_ROOT = Path("/sys/class/powercap")

_READ_ATTEMPTS = 5
_RETRY_DELAY_S = 0.001
#: Vendors whose package counter is per socket, so per-die package zones repeat one counter.
_SOCKET_SCOPED_VENDORS = frozenset({"AuthenticAMD", "HygonGenuine"})

_ZONE_DIR = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")
_PACKAGE_NAME = re.compile(r"^package-(\d+)(?:-die-(\d+))?$")
_INSIDE_PACKAGE = ("core", "uncore")


@dataclass(frozen=True)
class RaplZone:
    """One measured RAPL zone.

    ``zone_id`` is the powercap name (``intel-rapl:0:0``), ``name`` the zone's own name file
    (``package-0``, ``dram``), ``label`` the device label in readings (``package-0``,
    ``dram-0``), ``max_energy_range_uj`` where its counter wraps.
    """

    path: Path
    zone_id: str
    name: str
    domain: Domain
    label: str
    max_energy_range_uj: int

    @property
    def energy_file(self) -> Path:
        """The zone's cumulative energy counter, in microjoules."""
        return self.path / "energy_uj"


def rapl_root(root: Path | str | None = None) -> Path:
    """The powercap folder: ``root``, else ``$LLEM_RAPL_ROOT``, else ``/sys/class/powercap``."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ROOT_ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _zone_key(zone_id: str) -> tuple[int, int]:
    match = _ZONE_DIR.match(zone_id)
    if match is None:
        return (1 << 30, 0)
    return int(match.group(1)), -1 if match.group(2) is None else int(match.group(2))


def _zone_dirs(root: Path) -> dict[str, Path]:
    """Every ``intel-rapl:N`` and ``intel-rapl:N:M`` folder, flat or nested.

    ``/sys/class/powercap`` lists every zone at its top level; the kernel's own tree,
    ``/sys/devices/virtual/powercap``, nests them: ``intel-rapl/intel-rapl:N/intel-rapl:N:M``.
    Zones are looked for at the top and in the ``intel-rapl`` folder, subzones inside each zone.
    """
    found: dict[str, Path] = {}
    for folder in (root, root / "intel-rapl"):
        for zone in folder.glob("intel-rapl:*"):
            for path in (zone, *zone.glob("intel-rapl:*")):
                if _ZONE_DIR.match(path.name) and path.is_dir():
                    found.setdefault(path.name, path)
    return dict(sorted(found.items(), key=lambda item: _zone_key(item[0])))


def _read_small(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace").strip()
    except OSError:
        return None


def _parent_id(zone_id: str) -> str | None:
    match = _ZONE_DIR.match(zone_id)
    if match is None or match.group(2) is None:
        return None
    return f"intel-rapl:{match.group(1)}"


def _classify(zone_id: str, name: str, names: dict[str, str]) -> tuple[Domain, str] | None:
    """The domain and device label of a zone, or None for a zone the meter does not add."""
    if _PACKAGE_NAME.match(name):
        return "cpu", name
    if name == "dram":
        parent = _parent_id(zone_id)
        parent_name = names.get(parent, "") if parent else ""
        if parent_name.startswith("package-"):
            return "dram", "dram-" + parent_name.removeprefix("package-")
        return "dram", f"dram-{zone_id.removeprefix('intel-rapl:')}"
    return None


def _read_range(zone_id: str, path: Path) -> int:
    text = _read_small(path / "max_energy_range_uj")
    if text is None or not text.isdigit() or int(text) <= 0:
        raise MeterUnavailableError(
            "rapl", f"{zone_id}: max_energy_range_uj is missing or unreadable ({text!r})"
        )
    return int(text)


def rapl_zones(root: Path | str | None = None) -> tuple[list[RaplZone], list[str]]:
    """Find the package and dram zones under the powercap folder.

    Args:
        root: The powercap folder; None means :func:`rapl_root`'s choice.

    Returns:
        The zones to measure, and a line for each zone that exists but is not added (such as
        ``"core (intel-rapl:0:0): inside its package"``).

    Raises:
        MeterUnavailableError: The folder is missing or unreadable, or holds no RAPL package
            zone.
    """
    folder = rapl_root(root)
    try:
        dirs = _zone_dirs(folder) if folder.is_dir() else None
    except OSError as e:
        raise MeterUnavailableError("rapl", f"cannot list {folder}: {e}") from e
    if dirs is None:
        raise MeterUnavailableError(
            "rapl",
            f"no powercap folder at {folder} (not Linux, the intel_rapl_msr driver is not "
            f"loaded, or /sys is not mounted in this container; {ROOT_ENV_VAR} names another)",
        )
    names = {zone_id: _read_small(path / "name") or "" for zone_id, path in dirs.items()}
    zones: list[RaplZone] = []
    skipped: list[str] = []
    for zone_id, path in dirs.items():
        name = names[zone_id]
        kind = _classify(zone_id, name, names)
        if kind is None:
            skipped.append(f"{name or '?'} ({zone_id}): {_skip_reason(name)}")
            continue
        domain, label = kind
        zones.append(RaplZone(path, zone_id, name, domain, label, _read_range(zone_id, path)))
    if not any(zone.domain == "cpu" for zone in zones):
        found = ", ".join(f"{n or '?'} ({z})" for z, n in names.items()) or "no zone"
        raise MeterUnavailableError("rapl", f"no RAPL package zone under {folder} (found: {found})")
    return zones, skipped


def _skip_reason(name: str) -> str:
    if name in _INSIDE_PACKAGE:
        return "inside its package, not added"
    if name.startswith("psys"):
        return "the whole platform, which includes the package; not added"
    return "not a package or dram zone"


def _permission_hint(path: Path, root: Path) -> str:
    return (
        f"{path} is not readable by this user (Linux makes RAPL energy_uj root-only since the "
        f"2020 PLATYPUS fix, CVE-2020-8694); grant read access with `sudo chmod o+r "
        f"{root}/intel-rapl:*/energy_uj {root}/intel-rapl:*:*/energy_uj` (undone at reboot: "
        f"repeat it from a boot script, a systemd-tmpfiles rule or a udev rule), or run as root"
    )


def read_uj(zone: RaplZone) -> int:
    """Read a zone's counter, retrying a read that comes back empty, partial or failed.

    Raises:
        PermissionError: The file is not readable by this user (not retried).
        EnergyMeterError: The zone disappeared, or every attempt failed.
    """
    path = zone.energy_file
    problem = ""
    for attempt in range(_READ_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_DELAY_S * 2 ** (attempt - 1))
        try:
            with open(path, "rb") as handle:
                text = handle.read(64).strip()
        except PermissionError:
            raise
        except FileNotFoundError as e:
            raise EnergyMeterError(
                f"rapl: {zone.zone_id} disappeared ({path}; CPU offline or driver unloaded)"
            ) from e
        except OSError as e:
            problem = f"{type(e).__name__}: {e}"
            continue
        if text.isdigit():
            return int(text)
        problem = f"unexpected content {text[:20]!r}"
    raise EnergyMeterError(f"rapl: reading {path} failed {_READ_ATTEMPTS} times (last: {problem})")


def check_readable(zones: Sequence[RaplZone], root: Path) -> None:
    """Read each counter once; raises MeterUnavailableError with the reason where one fails."""
    for zone in zones:
        try:
            read_uj(zone)
        except PermissionError as e:
            raise MeterUnavailableError("rapl", _permission_hint(zone.energy_file, root)) from e
        except EnergyMeterError as e:
            raise MeterUnavailableError("rapl", str(e).removeprefix("rapl: ")) from e


def rapl_unavailable_reason(root: Path | None = None) -> str | None:
    """Why the RAPL meter cannot measure here, or None when a readable package zone exists.

    Cheap (a directory listing and one read per zone), never raises; for ``auto`` selection.

    Args:
        root: The powercap folder; None means ``$LLEM_RAPL_ROOT`` or ``/sys/class/powercap``.
    """
    try:
        folder = rapl_root(root)
        zones, _ = rapl_zones(folder)
        check_readable(zones, folder)
    except MeterUnavailableError as e:
        return e.reason
    return None


def read_cpu_vendor() -> str | None:
    """The CPU vendor string from /proc/cpuinfo (``GenuineIntel``, ``AuthenticAMD``)."""
    text = _read_small(Path("/proc/cpuinfo"))
    for line in (text or "").splitlines():
        if line.startswith("vendor_id"):
            return line.partition(":")[2].strip()
    return None


def drop_repeated_dies(
    zones: list[RaplZone], vendor: str | None
) -> tuple[list[RaplZone], list[str]]:
    """On AMD, keep one package zone per socket: per-die zones there repeat the socket counter."""
    if vendor not in _SOCKET_SCOPED_VENDORS:
        return zones, []
    kept: list[RaplZone] = []
    dropped: list[str] = []
    first_by_socket: dict[str, RaplZone] = {}
    dropped_ids: set[str] = set()
    for zone in zones:
        match = _PACKAGE_NAME.match(zone.name) if zone.domain == "cpu" else None
        if match is not None:
            first = first_by_socket.setdefault(match.group(1), zone)
            if first is not zone:
                dropped_ids.add(zone.zone_id)
                dropped.append(
                    f"{zone.name} ({zone.zone_id}): repeats {first.name}, the {vendor} package "
                    "counter is per socket; not added"
                )
                continue
        if _parent_id(zone.zone_id) in dropped_ids:
            dropped.append(f"{zone.name} ({zone.zone_id}): under a repeated die zone; not added")
            continue
        kept.append(zone)
    return kept, dropped
