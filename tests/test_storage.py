"""Saved runs: machine ids, file naming and counters, and finding a baseline by latest, name,
counter, machine or path."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.results import storage
from pytest_llem.results.models import GpuInfo, MachineInfo, RunRecord
from pytest_llem.results.storage import (
    list_saved_runs,
    machine_id,
    resolve_baseline,
    safe_name,
    save_run,
)
from pytest_llem.results.store import read_run_record

LINUX = "Linux-5.15.0-91-generic-x86_64-with-glibc2.35"
WHEN = datetime(2024, 5, 21, 10, 0, 0, tzinfo=timezone.utc)


def machine(hostname: str = "vm", platform: str = LINUX, gpus: tuple[str, ...] = ()) -> MachineInfo:
    return MachineInfo(
        hostname=hostname,
        platform=platform,
        python="3.11.4",
        gpus=[GpuInfo(index=i, name=name) for i, name in enumerate(gpus)],
    )


def record(
    *,
    commit: str | None = None,
    created_at: datetime = WHEN,
    hostname: str = "vm",
    run_id: str = "run-1",
) -> RunRecord:
    info = machine(hostname).model_copy(update={"git_commit": commit})
    return RunRecord(run_id=run_id, created_at=created_at, machine=info)


# --- machine id ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (machine(), "vm-linux-x86_64-cpu"),
        (machine("vm.example.com"), "vm-linux-x86_64-cpu"),
        (machine("node1", gpus=("NVIDIA H100 80GB HBM3",)), "node1-linux-x86_64-1xh100"),
        (
            machine("Node_2", gpus=("NVIDIA A100-SXM4-40GB", "NVIDIA L4", "NVIDIA A100-SXM4-40GB")),
            "node-2-linux-x86_64-2xa100-1xl4",
        ),
        (machine("ws", gpus=("NVIDIA GeForce RTX 4090",)), "ws-linux-x86_64-1xrtx4090"),
        (machine("mac", platform="macOS-14.2-arm64-arm-64bit"), "mac-macos-arm64-cpu"),
        (machine("win", platform="Windows-10-10.0.19045-SP0"), "win-windows-cpu"),
    ],
)
def test_machine_id(info: MachineInfo, expected: str) -> None:
    assert machine_id(info) == expected
    assert machine_id(RunRecord(run_id="r", created_at=WHEN, machine=info)) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, "run"),
        ("", "run"),
        ("  ", "run"),
        ("main", "main"),
        ("feature/x y", "feature-x-y"),
        ("v1.2_rc", "v1.2_rc"),
        ("../..", "run"),
    ],
)
def test_safe_name(name: str | None, expected: str) -> None:
    assert safe_name(name) == expected


# --- saving ----------------------------------------------------------------------------------


def test_save_names_and_counts(tmp_path: Path) -> None:
    first = save_run(record(), tmp_path, None)
    assert first == tmp_path / "vm-linux-x86_64-cpu" / "0001_run_nocommit_20240521T100000Z.json"
    second = save_run(record(commit="ABCDEF1234567890"), tmp_path, "main")
    assert second.name == "0002_main_abcdef12_20240521T100000Z.json"
    third = save_run(record(commit="not-a-sha"), tmp_path, "feature/x")
    assert third.name == "0003_feature-x_nocommit_20240521T100000Z.json"
    assert read_run_record(second) == record(commit="ABCDEF1234567890")
    assert [run.label for run in list_saved_runs(tmp_path, "vm-linux-x86_64-cpu")] == [
        "0001_run",
        "0002_main",
        "0003_feature-x",
    ]


def test_counter_is_one_above_the_highest(tmp_path: Path) -> None:
    folder = tmp_path / "vm-linux-x86_64-cpu"
    folder.mkdir()
    (folder / "0007_old_nocommit_20240101T000000Z.json").write_text("{}")
    (folder / "notes.json").write_text("{}")  # not a saved run: ignored
    (folder / "9999.txt").write_text("")
    path = save_run(record(), tmp_path, "next")
    assert path.name.startswith("0008_next_")


def test_time_is_written_in_utc(tmp_path: Path) -> None:
    local = datetime(2024, 5, 21, 12, 30, 5, tzinfo=timezone(timedelta(hours=2)))
    assert save_run(record(created_at=local), tmp_path, None).name.endswith(
        "_20240521T103005Z.json"
    )
    naive = datetime(2024, 5, 21, 12, 30, 5)  # taken as UTC
    assert save_run(record(created_at=naive), tmp_path, None).name.endswith(
        "_20240521T123005Z.json"
    )


def test_two_saves_racing_for_one_counter_keep_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two processes saving in the same second both list the folder before either has written:
    # replay that by giving the second save the listing the first one saw.
    stale = list_saved_runs(tmp_path, "vm-linux-x86_64-cpu")
    first = save_run(record(run_id="first"), tmp_path, "ci")
    monkeypatch.setattr(storage, "list_saved_runs", lambda *_: stale)
    second = save_run(record(run_id="second"), tmp_path, "ci")
    assert first.name == "0001_ci_nocommit_20240521T100000Z.json"
    assert second.name == "0002_ci_nocommit_20240521T100000Z.json"
    assert read_run_record(first).run_id == "first"
    assert read_run_record(second).run_id == "second"


def test_a_file_where_the_machine_folder_should_be_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "vm-linux-x86_64-cpu").write_text("")
    with pytest.raises(ResultStoreError, match="cannot save the run under"):
        save_run(record(), tmp_path, None)


def test_save_error_is_a_result_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ResultStoreError, match="cannot save the run under"):
        save_run(record(), blocker, None)


# --- resolving -------------------------------------------------------------------------------

MID = "vm-linux-x86_64-cpu"


@pytest.fixture
def saved(tmp_path: Path) -> dict[str, Path]:
    return {
        "0001": save_run(record(run_id="a"), tmp_path, "main"),
        "0002": save_run(record(run_id="b"), tmp_path, "pr"),
        "0003": save_run(record(run_id="c"), tmp_path, "main"),
        "0004": save_run(record(run_id="d"), tmp_path, "2024"),
        "other": save_run(record(run_id="e", hostname="node1"), tmp_path, "main"),
    }


def test_resolve_latest_name_and_counter(tmp_path: Path, saved: dict[str, Path]) -> None:
    assert resolve_baseline("latest", tmp_path, MID) == saved["0004"]
    assert resolve_baseline("", tmp_path, MID) == saved["0004"]
    assert resolve_baseline("main", tmp_path, MID) == saved["0003"]  # the newest of that name
    assert resolve_baseline("pr", tmp_path, MID) == saved["0002"]
    assert resolve_baseline("0001", tmp_path, MID) == saved["0001"]
    assert resolve_baseline("2", tmp_path, MID) == saved["0002"]
    assert resolve_baseline("2024", tmp_path, MID) == saved["0004"]  # no counter 2024: a name


def test_resolve_other_machine_and_paths(
    tmp_path: Path, saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_baseline("node1-linux-x86_64-cpu/latest", tmp_path, MID) == saved["other"]
    assert resolve_baseline("node1-linux-x86_64-cpu/main", tmp_path, MID) == saved["other"]
    assert resolve_baseline("node1-linux-x86_64-cpu/", tmp_path, MID) == saved["other"]
    assert resolve_baseline(str(saved["0002"]), tmp_path, MID) == saved["0002"]
    relative = f"{MID}/{saved['0001'].name}"
    assert resolve_baseline(relative, tmp_path, MID) == tmp_path / relative  # inside storage
    monkeypatch.chdir(tmp_path.parent)
    from_cwd = Path(tmp_path.name) / MID / saved["0001"].name
    assert resolve_baseline(str(from_cwd), tmp_path, MID) == from_cwd


def test_resolve_errors_list_what_exists(tmp_path: Path, saved: dict[str, Path]) -> None:
    with pytest.raises(ResultStoreError) as info:
        resolve_baseline("nightly", tmp_path, MID)
    text = str(info.value)
    assert text.startswith(f"no saved run named 'nightly' for machine {MID}; saved runs of {MID}")
    assert saved["0004"].name in text
    assert saved["0001"].name in text
    assert "other machines with saved runs: node1-linux-x86_64-cpu" in text
    with pytest.raises(ResultStoreError, match="no saved run numbered 0009 for machine"):
        resolve_baseline("0009", tmp_path, MID)
    with pytest.raises(ResultStoreError, match=r"no such run record: missing\.json"):
        resolve_baseline("missing.json", tmp_path, MID)
    with pytest.raises(ResultStoreError, match="no such run record: nowhere/latest"):
        resolve_baseline("nowhere/latest", tmp_path, MID)


def test_resolve_in_empty_storage(tmp_path: Path) -> None:
    with pytest.raises(ResultStoreError) as info:
        resolve_baseline("latest", tmp_path / "none", MID)
    assert str(info.value) == (
        f"no saved run for machine {MID}; saved runs of {MID} in {tmp_path / 'none'}: none"
    )


def test_resolve_lists_only_the_ten_newest(tmp_path: Path) -> None:
    for _ in range(12):
        save_run(record(), tmp_path, "x")
    with pytest.raises(ResultStoreError) as info:
        resolve_baseline("y", tmp_path, MID)
    text = str(info.value)
    assert "0012_x_" in text
    assert "0002_x_" not in text
    assert "(and 2 older)" in text
