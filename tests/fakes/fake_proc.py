"""A fake ``/proc`` and ``/sys`` tree whose CPU load the test sets, for the machine-state probe.

:class:`FakeProc` writes ``proc/stat`` (aggregate and per-CPU lines), ``proc/loadavg``,
``proc/<pid>/stat`` for this run's process tree and other processes, and, when given a
frequency, ``sys/devices/system/cpu/cpuN/cpufreq/scaling_cur_freq``. Its clock advances the
counters: every read of :meth:`clock` moves time on by ``step_s`` and adds the CPU ticks that
``own_cores``, ``other_cores`` and ``steal_cores`` use in that time, so a probe built by
:meth:`probe` sees exactly the load the test set.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pytest_llem.harness.machine_state import MachineProbe

__all__ = ["FakeProc", "FakeProcess"]

TICK = 100


@dataclass
class FakeProcess:
    """One process of the fake tree (ticks are clock ticks)."""

    pid: int
    name: str
    ppid: int
    ticks: float = 0.0
    child_ticks: float = 0.0
    start: int = 1
    state: str = "S"

    def stat(self) -> str:
        fields = [self.state, self.ppid, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        fields += [int(self.ticks), 0, int(self.child_ticks), 0, 20, 0, 1, 0, self.start]
        return f"{self.pid} ({self.name}) " + " ".join(str(f) for f in fields) + " 0 0\n"


class FakeProc:
    """The tree under ``root``; this run is ``root_pid``, another program is ``other_pid``.

    Args:
        root: A folder for ``proc/`` and ``sys/``.
        cpus: CPUs listed in ``proc/stat``.
        step_s: Seconds each read of the clock moves time on.
        freq_mhz: CPU frequency written to cpufreq (None: no cpufreq, and no cpuinfo either).
    """

    root_pid = 1000
    other_pid = 2000

    def __init__(
        self, root: Path, *, cpus: int = 2, step_s: float = 1.0, freq_mhz: float | None = None
    ) -> None:
        self.proc = root / "proc"
        self.sys = root / "sys"
        self.cpus = cpus
        self.step_s = step_s
        self.freq_mhz = freq_mhz
        self.own_cores = 1.0
        self.other_cores = 0.0
        self.steal_cores = 0.0
        self.load = 0.5
        self.time = 0.0
        self.busy = 0.0
        self.steal = 0.0
        self.idle = 0.0
        #: Files of ``proc/`` not written (unreadable), e.g. ``{"stat", "loadavg"}``.
        self.missing: set[str] = set()
        self.processes = {
            1: FakeProcess(1, "init", 0),
            self.root_pid: FakeProcess(self.root_pid, "pytest", 1),
            self.root_pid + 1: FakeProcess(self.root_pid + 1, "engine worker", self.root_pid),
            self.other_pid: FakeProcess(self.other_pid, "burner", 1),
        }
        self.write()

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass under the set load."""
        own = self.own_cores * seconds * TICK
        other = self.other_cores * seconds * TICK
        steal = self.steal_cores * seconds * TICK
        self.processes[self.root_pid].ticks += own / 2
        self.processes[self.root_pid + 1].ticks += own / 2
        self.processes[self.other_pid].ticks += other
        self.busy += own + other
        self.steal += steal
        self.idle += max(self.cpus * seconds * TICK - own - other - steal, 0.0)
        self.time += seconds
        self.write()

    def clock(self) -> float:
        """The probe's clock: each read is ``step_s`` later."""
        self.advance(self.step_s)
        return self.time

    def write(self) -> None:
        """Write the tree as it stands."""
        self.proc.mkdir(parents=True, exist_ok=True)
        head = [int(self.busy), 0, 0, int(self.idle), 0, 0, 0, int(self.steal), 0, 0]
        lines = ["cpu  " + " ".join(str(v) for v in head)]
        lines += [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(self.cpus)]
        files = {
            "stat": "\n".join(lines) + "\nintr 0\n",
            "loadavg": f"{self.load:.2f} 0.40 0.30 1/100 {self.other_pid}\n",
        }
        for name, text in files.items():
            if name in self.missing:
                (self.proc / name).unlink(missing_ok=True)
            else:
                (self.proc / name).write_text(text)
        for folder in self.proc.iterdir():
            if folder.name.isdigit() and int(folder.name) not in self.processes:
                shutil.rmtree(folder)  # the process is gone
        burner = self.processes.get(self.other_pid)
        if burner is not None:  # running while it burns
            burner.state = "R" if self.other_cores > 0 else "S"
        for process in self.processes.values():
            folder = self.proc / str(process.pid)
            folder.mkdir(exist_ok=True)
            (folder / "stat").write_text(process.stat())
        if self.freq_mhz is not None:
            for i in range(self.cpus):
                folder = self.sys / "devices" / "system" / "cpu" / f"cpu{i}" / "cpufreq"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "scaling_cur_freq").write_text(f"{int(self.freq_mhz * 1000)}\n")

    def probe(self, **kwargs: object) -> MachineProbe:
        """A probe reading this tree (``gpu_processes`` may be passed; others are ignored)."""
        gpu = kwargs.get("gpu_processes")
        return MachineProbe(
            proc=self.proc,
            sys=self.sys,
            root_pid=self.root_pid,
            clock=self.clock,
            clock_tick=TICK,
            gpu_processes=gpu if callable(gpu) else None,  # type: ignore[arg-type]
        )
