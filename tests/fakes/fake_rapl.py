"""An honest fake of the Linux powercap RAPL tree for tests on machines without RAPL.

``FakeRaplTree`` lays out zone folders (``intel-rapl:N``, ``intel-rapl:N:M``) with ``name``,
``energy_uj`` and ``max_energy_range_uj`` files as ``/sys/class/powercap`` does (every zone at
the top level), or nested as the kernel's ``/sys/devices/virtual/powercap`` does
(``intel-rapl/intel-rapl:N/intel-rapl:N:M``), and a writer
thread advances each zone's ``energy_uj`` at its power on the real clock every
``update_period_s`` (or at irregular intervals cycling through ``update_pattern_s``), wrapping
past ``max_energy_range_uj``. Every write is atomic (a temporary file, then ``os.replace``), as a
sysfs read is. Use it as a context manager to run the writer; without it the counters move only
when the test says (``add_energy``).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = [
    "INTEL_RANGE_UJ",
    "FakeRaplTree",
    "FakeZone",
    "amd_zones",
    "intel_zones",
]

#: ``max_energy_range_uj`` of a typical Intel package zone (32-bit counter x 61 uJ).
INTEL_RANGE_UJ = 262_143_328_850
#: The same on AMD (32-bit counter x 15.3 uJ).
AMD_RANGE_UJ = 65_712_999_613


@dataclass
class FakeZone:
    """One zone: its powercap id, name file, power and counter.

    ``energy_uj`` is the counter as the file shows it (wrapped); ``total_uj`` the energy since
    the tree was made, never wrapped; ``wraps`` counts the wrap-arounds.
    """

    zone_id: str
    name: str
    power_w: float
    max_energy_range_uj: int = INTEL_RANGE_UJ
    energy_uj: int = 5_000_000
    readable: bool = True
    total_uj: float = 0.0
    wraps: int = 0
    _fraction_uj: float = field(default=0.0, repr=False)

    def advance(self, seconds: float) -> None:
        """Add ``power_w * seconds`` to the counter, wrapping past its range."""
        self._fraction_uj += self.power_w * seconds * 1e6
        whole = int(self._fraction_uj)
        self._fraction_uj -= whole
        self.add(whole)

    def add(self, energy_uj: int) -> None:
        """Add ``energy_uj`` whole microjoules to the counter, wrapping past its range."""
        self.total_uj += energy_uj
        value = self.energy_uj + energy_uj
        while value >= self.max_energy_range_uj:
            value -= self.max_energy_range_uj
            self.wraps += 1
        self.energy_uj = value


def intel_zones(
    packages: int = 1,
    *,
    package_w: float = 10.0,
    dram_w: float | None = 2.0,
    core_w: float | None = 6.0,
    psys_w: float | None = None,
    max_energy_range_uj: int = INTEL_RANGE_UJ,
) -> list[FakeZone]:
    """Zones as an Intel server shows them: ``package-N`` with ``core`` and ``dram`` subzones.

    ``psys_w`` adds a platform zone (``psys``) after the packages, as laptops have.
    """
    zones: list[FakeZone] = []
    for n in range(packages):
        zones.append(FakeZone(f"intel-rapl:{n}", f"package-{n}", package_w, max_energy_range_uj))
        sub = 0
        for name, watts in (("core", core_w), ("dram", dram_w)):
            if watts is not None:
                zones.append(FakeZone(f"intel-rapl:{n}:{sub}", name, watts, max_energy_range_uj))
                sub += 1
    if psys_w is not None:
        zones.append(FakeZone(f"intel-rapl:{packages}", "psys", psys_w, max_energy_range_uj))
    return zones


def amd_zones(packages: int = 1, *, package_w: float = 10.0, core_w: float = 6.0) -> list[FakeZone]:
    """Zones as AMD Zen shows them: the same ``intel-rapl`` names, package and core, no dram."""
    zones: list[FakeZone] = []
    for n in range(packages):
        zones.append(FakeZone(f"intel-rapl:{n}", f"package-{n}", package_w, AMD_RANGE_UJ))
        zones.append(FakeZone(f"intel-rapl:{n}:0", "core", core_w, AMD_RANGE_UJ))
    return zones


def _write_atomic(path: Path, text: str, mode: int = 0o444) -> None:
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # the umask may have taken bits away
    os.replace(tmp, path)


class FakeRaplTree:
    """A powercap folder with RAPL zones whose counters advance in real time.

    Args:
        root: The folder to fill (it is created); point ``LLEM_RAPL_ROOT`` or the meter there.
        zones: The zones; all at the top level, as in ``/sys/class/powercap`` (whose entries
            link into the nested tree), or nested with ``nested=True``.
        update_period_s: How often the writer advances the counters.
        nested: Lay the zones out as ``/sys/devices/virtual/powercap`` does: packages in the
            ``intel-rapl`` control-type folder, subzones inside their package's folder.
        update_pattern_s: The writer's successive intervals (cycled) instead of the regular
            ``update_period_s``: a counter whose updates are not evenly spaced.
    """

    def __init__(
        self,
        root: Path,
        zones: list[FakeZone],
        *,
        update_period_s: float = 0.002,
        nested: bool = False,
        update_pattern_s: tuple[float, ...] = (),
    ) -> None:
        self.root = root
        self.zones = {zone.zone_id: zone for zone in zones}
        self.update_period_s = update_period_s
        self.update_pattern_s = update_pattern_s or (update_period_s,)
        self.writes = 0
        self.max_tick_gap_s = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._paused = False
        root.mkdir(parents=True, exist_ok=True)
        (root / "intel-rapl").mkdir(exist_ok=True)  # the control type folder, not a zone
        _write_atomic(root / "intel-rapl" / "enabled", "1\n")
        self._paths = {zone.zone_id: self._zone_path(zone.zone_id, nested) for zone in zones}
        for zone in zones:
            path = self._paths[zone.zone_id]
            path.mkdir(parents=True, exist_ok=True)
            _write_atomic(path / "name", f"{zone.name}\n")
            _write_atomic(path / "max_energy_range_uj", f"{zone.max_energy_range_uj}\n")
            self._write_energy(zone)
        self._last = time.perf_counter()

    def _zone_path(self, zone_id: str, nested: bool) -> Path:
        if not nested:
            return self.root / zone_id
        parts = zone_id.split(":")
        parent = self.root / "intel-rapl"
        if len(parts) == 3:
            parent /= ":".join(parts[:2])
        return parent / zone_id

    def path(self, zone_id: str) -> Path:
        """The folder of a zone."""
        return self._paths[zone_id]

    def _write_energy(self, zone: FakeZone) -> None:
        mode = 0o444 if zone.readable else 0o000
        _write_atomic(self._paths[zone.zone_id] / "energy_uj", f"{zone.energy_uj}\n", mode)
        self.writes += 1

    def tick(self) -> None:
        """Advance every counter by the time since the last tick and rewrite the files."""
        with self._lock:
            now = time.perf_counter()
            elapsed, self._last = now - self._last, now
            self.max_tick_gap_s = max(self.max_tick_gap_s, elapsed)
            if self._paused:
                return
            for zone in self.zones.values():
                zone.advance(elapsed)
                self._write_energy(zone)

    def reset_tick_gap(self) -> None:
        """Start tracking the longest interval between two ticks afresh.

        A counter read lags the true energy by at most the interval around it, so twice
        ``max_tick_gap_s`` bounds a window's error (it grows when the machine is loaded).
        """
        with self._lock:
            self.max_tick_gap_s = 0.0

    def set_energy(self, zone_id: str, energy_uj: int) -> None:
        """Move a zone's counter (to put it just below its wrap, say); the total is unchanged."""
        with self._lock:
            zone = self.zones[zone_id]
            zone.energy_uj = energy_uj
            self._write_energy(zone)

    def add_energy(self, zone_id: str, energy_uj: int) -> None:
        """Advance a zone's counter by ``energy_uj`` now (wrapping), as the hardware would."""
        with self._lock:
            zone = self.zones[zone_id]
            zone.add(energy_uj)
            self._write_energy(zone)

    def write_raw(self, zone_id: str, text: str) -> None:
        """Write ``text`` as the zone's ``energy_uj`` (garbage, an empty file) and pause the
        writer so it stays there until :meth:`resume`."""
        with self._lock:
            self._paused = True
            _write_atomic(self._paths[zone_id] / "energy_uj", text)

    def resume(self) -> None:
        """Rewrite the true counters and let the writer go on."""
        with self._lock:
            self._paused = False
            self._last = time.perf_counter()
            for zone in self.zones.values():
                self._write_energy(zone)

    def _run(self) -> None:
        intervals = itertools.cycle(self.update_pattern_s)
        while not self._stop.wait(next(intervals)):
            self.tick()

    def start(self) -> None:
        """Start the writer thread."""
        self._last = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fake-rapl-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the writer thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeRaplTree:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
