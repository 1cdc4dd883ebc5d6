"""Saved runs: ``--llem-save`` keeps run records in a storage folder, one subfolder per machine.

A saved run lives at ``<storage>/<machine id>/<NNNN>_<name>_<commit>_<YYYYmmddTHHMMSSZ>.json``
(``NNNN`` counts up per machine); ``--llem-compare`` finds a baseline there by ``latest``, by
name, by counter or by path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.results.models import MachineInfo, RunRecord
from pytest_llem.results.store import create_text_exclusively

__all__ = [
    "DEFAULT_STORAGE",
    "SavedRun",
    "list_saved_runs",
    "machine_id",
    "resolve_baseline",
    "safe_name",
    "save_run",
    "saved_runs_newest_first",
]

#: Storage folder when neither ``--llem-storage`` nor the ini key is given.
DEFAULT_STORAGE = ".llem"

#: Counters tried, one after the other, when concurrent saves take the next ones.
_SAVE_ATTEMPTS = 1000

_FILE = re.compile(r"^(\d{4,})_(.+)_([0-9a-f]{8}|nocommit)_(\d{8}T\d{6}Z)\.json$")
_ARCHES = ("x86_64", "amd64", "aarch64", "arm64", "armv7l", "i686", "i386", "ppc64le", "s390x")
_GPU_NOISE = frozenset({"nvidia", "geforce", "tesla", "corporation", "amd", "radeon"})


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _gpu_slug(name: str) -> str:
    """``h100`` for ``NVIDIA H100 80GB HBM3``: the words up to the first one with a digit."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _GPU_NOISE]
    kept: list[str] = []
    for word in words:
        kept.append(word)
        if any(ch.isdigit() for ch in word):
            break
    return "".join(kept) or "gpu"


def machine_id(record: RunRecord | MachineInfo) -> str:
    """A short, stable slug naming the machine a run was measured on.

    Made of the short hostname, the operating system, the architecture and the GPUs (counted
    by model) or ``cpu``: ``vm-linux-x86_64-cpu``, ``node1-linux-x86_64-1xh100``,
    ``node2-linux-x86_64-2xa100-1xl4``.
    """
    machine = record.machine if isinstance(record, RunRecord) else record
    host = _slug(machine.hostname.split(".", 1)[0]) or "host"
    system = _slug(machine.platform.split("-", 1)[0]) or "unknown"
    lowered = machine.platform.lower()
    arch = next((a for a in _ARCHES if a in lowered), None)
    counts: dict[str, int] = {}
    for gpu in machine.gpus:
        slug = _gpu_slug(gpu.name)
        counts[slug] = counts.get(slug, 0) + 1
    gpus = "-".join(f"{n}x{slug}" for slug, n in sorted(counts.items())) or "cpu"
    return "-".join(part for part in (host, system, arch, gpus) if part)


def safe_name(name: str | None) -> str:
    """The name part of a saved run's file: ``run`` when empty, unsafe characters as ``-``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", (name or "").strip()).strip("-.")
    return cleaned or "run"


@dataclass(frozen=True)
class SavedRun:
    """One saved run, read from its file name."""

    path: Path
    machine: str
    counter: int
    name: str
    commit: str | None
    stamp: str

    @property
    def label(self) -> str:
        """``0003_main`` style, for messages."""
        return f"{self.counter:04d}_{self.name}"


def _parse(path: Path, machine: str) -> SavedRun | None:
    match = _FILE.match(path.name)
    if match is None:
        return None
    counter, name, commit, stamp = match.groups()
    return SavedRun(
        path=path,
        machine=machine,
        counter=int(counter),
        name=name,
        commit=None if commit == "nocommit" else commit,
        stamp=stamp,
    )


def list_saved_runs(storage: Path, machine: str) -> list[SavedRun]:
    """The saved runs of one machine, oldest first (by counter); [] when there are none."""
    folder = storage / machine
    if not folder.is_dir():
        return []
    runs = [run for path in folder.glob("*.json") if (run := _parse(path, machine)) is not None]
    return sorted(runs, key=lambda run: (run.counter, run.stamp))


def _machines(storage: Path) -> list[str]:
    if not storage.is_dir():
        return []
    return sorted(
        p.name for p in storage.iterdir() if p.is_dir() and list_saved_runs(storage, p.name)
    )


def saved_runs_newest_first(storage: Path) -> list[SavedRun]:
    """Every machine's saved runs, newest first by their time stamp (then machine id and
    counter, so the order is the same wherever the folder is read)."""
    runs = [run for machine in _machines(storage) for run in list_saved_runs(storage, machine)]
    return sorted(runs, key=lambda run: (run.stamp, run.machine, run.counter), reverse=True)


def save_run(record: RunRecord, storage: Path, name: str | None = None) -> Path:
    """Save a run record under its machine's folder with the next counter.

    The file is created exclusively: when another process saved under the same counter in the
    meantime, the next free counter is taken, so no saved run is ever overwritten.

    Args:
        record: The run to save.
        storage: The storage folder (created when missing).
        name: The name part of the file (``run`` when None or empty); characters other than
            letters, digits, ``.``, ``_`` and ``-`` become ``-``.

    Returns:
        ``<storage>/<machine id>/<NNNN>_<name>_<commit[:8] or nocommit>_<UTC time>.json``.

    Raises:
        ResultStoreError: the file could not be written.
    """
    machine = machine_id(record)
    runs = list_saved_runs(storage, machine)
    counter = runs[-1].counter + 1 if runs else 1
    commit = (record.machine.git_commit or "")[:8].lower()
    if not re.fullmatch(r"[0-9a-f]{8}", commit):
        commit = "nocommit"
    created = record.created_at
    created = created.astimezone(timezone.utc) if created.tzinfo else created
    stamp = created.strftime("%Y%m%dT%H%M%SZ")
    text = record.model_dump_json(indent=2) + "\n"
    for _ in range(_SAVE_ATTEMPTS):
        path = storage / machine / f"{counter:04d}_{safe_name(name)}_{commit}_{stamp}.json"
        try:
            create_text_exclusively(path, text)
        except FileExistsError as e:
            if not path.exists():  # not the name: a file where a folder should be
                raise ResultStoreError(f"cannot save the run under {storage}: {e}") from e
            counter += 1
            continue
        except OSError as e:
            raise ResultStoreError(f"cannot save the run under {storage}: {e}") from e
        return path
    raise ResultStoreError(
        f"cannot save the run under {storage / machine}: {_SAVE_ATTEMPTS} counters in a row taken"
    )


def _available(storage: Path, machine: str) -> str:
    runs = list_saved_runs(storage, machine)
    mine = ", ".join(run.path.name for run in reversed(runs[-10:])) if runs else "none"
    more = f" (and {len(runs) - 10} older)" if len(runs) > 10 else ""
    others = [m for m in _machines(storage) if m != machine]
    other_text = (
        f"; other machines with saved runs: {', '.join(others)} (select one with MACHINE/NAME, "
        "MACHINE/latest or a path)"
        if others
        else ""
    )
    return f"saved runs of {machine} in {storage}: {mine}{more}{other_text}"


def _select(spec: str, storage: Path, machine: str) -> Path:
    runs = list_saved_runs(storage, machine)
    found: list[SavedRun]
    if spec == "latest":
        found = runs
        what = "no saved run"
    elif spec.isdigit():
        found = [run for run in runs if run.counter == int(spec)]
        if not found:
            found = [run for run in runs if run.name == spec]
        what = f"no saved run numbered {spec}"
    else:
        found = [run for run in runs if run.name == safe_name(spec)]
        what = f"no saved run named {spec!r}"
    if not found:
        raise ResultStoreError(f"{what} for machine {machine}; {_available(storage, machine)}")
    return found[-1].path


def resolve_baseline(spec: str, storage: Path, record_machine: str) -> Path:
    """Find the saved run that ``--llem-compare=SPEC`` names.

    ``SPEC`` is, in this order: a path to a JSON file (absolute, relative to the working
    folder, or relative to ``storage``); ``MACHINE/SELECTOR`` for another machine's runs;
    ``latest`` (the newest run of ``record_machine``); a counter (``3`` or ``0003``; a name made
    of digits is tried when no counter matches); or a name (the newest run saved under it).

    Args:
        spec: What the user gave.
        storage: The storage folder.
        record_machine: :func:`machine_id` of the current run.

    Returns:
        The path of the baseline's JSON file.

    Raises:
        ResultStoreError: nothing matches; the message lists the saved runs that exist.
    """
    spec = spec.strip() or "latest"
    for candidate in (Path(spec), storage / spec):
        if candidate.is_file():
            return candidate
    if "/" in spec:
        trimmed = spec.rstrip("/")
        head, _, tail = trimmed.rpartition("/") if "/" in trimmed else (trimmed, "", "latest")
        if head and (storage / head).is_dir() and not tail.endswith(".json"):
            return _select(tail, storage, head)
    if spec.endswith(".json") or "/" in spec:
        raise ResultStoreError(f"no such run record: {spec}; {_available(storage, record_machine)}")
    return _select(spec, storage, record_machine)
