"""The per-case journal: durable lines, rebuilding after a kill, damaged lines, Ctrl-C."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.results.journal import Journal, read_journal
from pytest_llem.results.models import SCHEMA_VERSION, CaseRecord, MachineInfo

pytest_plugins = ["pytester"]

MACHINE = MachineInfo(hostname="h", platform="p", python="3.11")
START = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)


def test_journal_round_trip_and_damaged_last_line(tmp_path: Path):
    path = tmp_path / "runs" / "j.jsonl"
    journal = Journal(path)
    journal.start(run_id="abc123", created_at=START, options={"meter": "none"})
    journal.append(CaseRecord(id="t::a", name="a"))
    journal.append(CaseRecord(id="t::b", name="b", outcome="failed"))
    journal.close()
    with path.open("a") as handle:
        handle.write('{"type": "case", "case": {"id": "t::c"')  # died mid-write
    contents = read_journal(path, machine=MACHINE)
    assert [c.id for c in contents.record.cases] == ["t::a", "t::b"]
    assert contents.record.run_id == "abc123"
    assert contents.record.created_at == START
    assert contents.record.options["meter"] == "none"
    assert len(contents.warnings) == 1
    assert ":4: damaged journal line skipped" in contents.warnings[0]


def test_the_header_keeps_the_profile_for_the_rebuilt_record(tmp_path: Path):
    from pytest_llem.results.models import ProfileRecord

    profile = ProfileRecord(name="standard", reason="auto: a CUDA GPU is present (/dev/nvidia0)")
    path = tmp_path / "kept.jsonl"
    journal = Journal(path)
    journal.start(run_id="abc123", created_at=START, options={}, profile=profile)
    journal.close()
    assert read_journal(path, machine=MACHINE).record.profile == profile

    older = tmp_path / "older.jsonl"
    journal = Journal(older)
    journal.start(run_id="abc123", created_at=START, options={})
    journal.close()
    assert read_journal(older, machine=MACHINE).record.profile is None


def test_the_header_carries_the_schema_version_and_is_checked(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    journal.start(run_id="abc123", created_at=START, options={})
    journal.close()
    header = json.loads(path.read_text().splitlines()[0])
    assert header["schema_version"] == SCHEMA_VERSION
    header["schema_version"] = "7.3"
    path.write_text(json.dumps(header) + "\n")
    with pytest.raises(ResultStoreError, match=r"unsupported schema_version '7.3'; .* reads 1.0"):
        read_journal(path, machine=MACHINE)
    del header["schema_version"]  # journals written before the header had one: schema 1.0
    path.write_text(json.dumps(header) + "\n")
    assert read_journal(path, machine=MACHINE).record.run_id == "abc123"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"created_at": "2026-11-26T10:00:00+00:00"}, "has no run_id"),
        ({"run_id": "r", "created_at": "yesterday"}, "created_at is not a time"),
        ({"run_id": "r", "created_at": "2026-11-26", "options": [1]}, "options are not"),
    ],
)
def test_a_bad_header_is_a_store_error(tmp_path: Path, header: dict, message: str):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"type": "run", **header}) + "\n")
    with pytest.raises(ResultStoreError, match=message):
        read_journal(path, machine=MACHINE)


def test_a_file_without_header_is_not_a_journal(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"type": "case", "case": {"id": "a", "name": "a"}}\n')
    with pytest.raises(ResultStoreError, match="no run header"):
        read_journal(path, machine=MACHINE)


KILLED = """
import os
import signal

import pytest

@pytest.mark.llem(num_prompts=1, max_new_tokens=2)
@pytest.mark.llem_sweep(seed=[1, 2, 3])
def test_sweep(llem):
    if llem.config.seed == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the machine dies during the second case
    llem.run()
"""


def test_killed_run_leaves_a_journal_that_rebuilds_the_record(
    pytester: pytest.Pytester, tiny_model: Path
):
    pytester.makepyfile(KILLED)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--llem-meter=none",
         "--llem-repeat=1", "--llem-warmup=0"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode < 0  # killed
    assert not (pytester.path / "reports" / "llem-report.json").exists()
    (journal,) = (pytester.path / "reports" / "runs").glob("llem-journal-*.jsonl")
    rebuilt = subprocess.run(
        [sys.executable, "-m", "pytest_llem.cli", "report", "--from-journal", str(journal)],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        check=True,
    )
    record = json.loads(journal.with_suffix(".json").read_text())
    assert [case["id"].rsplit("::", 1)[-1] for case in record["cases"]] == ["test_sweep[seed1]"]
    assert record["cases"][0]["repetitions"][0]["output_tokens"] >= 1
    assert journal.with_suffix(".html").exists()
    assert str(journal.with_suffix(".html")) in rebuilt.stdout


def test_interrupt_writes_the_partial_record_and_marks_the_case(
    pytester: pytest.Pytester, tiny_model: Path
):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(num_prompts=1, max_new_tokens=2)
        @pytest.mark.llem_sweep(seed=[1, 2, 3])
        def test_sweep(llem):
            if llem.config.seed == 2:
                raise KeyboardInterrupt
            llem.run()
        """
    )
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--llem-meter=none", "--llem-repeat=1", no_reraise_ctrlc=True
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    outcomes = {c["name"]: (c["outcome"], (c["error"] or {}).get("type")) for c in record["cases"]}
    assert outcomes == {
        "test_sweep[seed1]": ("passed", None),
        "test_sweep[seed2]": ("error", "KeyboardInterrupt"),
    }
