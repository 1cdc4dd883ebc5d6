"""What a run writes at the end (record, copy, journal, HTML, CSV, saved run) as a pytest user
meets it: checked writable before any case runs, created with ordinary permissions, and never
lost or failed silently."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_llem.outputs import OUTPUTS, check_outputs, explicit_llem_run

pytest_plugins = ["pytester"]

#: A scripted engine so these runs cost milliseconds, not a model load.
CONFTEST = """
from tests.fakes.fake_backend import FakeBackend, FakeClock


def pytest_llem_backend_names():
    return ["scripted"]


def pytest_llem_make_backend(name, case, progress):
    return FakeBackend(FakeClock(), lengths={}) if name == "scripted" else None
"""

QUICK = [
    "-p",
    "no:cacheprovider",
    "--llem-backend=scripted",
    "--llem-meter=none",
    "--llem-baseline-s=0",
    "--llem-warmup=0",
    "--llem-repeat=1",
]

#: Leaves a file behind when it runs, so a test can tell whether any case ran.
CASE = """
import pathlib

import pytest

@pytest.mark.llem(num_prompts=2, max_new_tokens=2)
def test_case(llem):
    pathlib.Path("case-ran").write_text("yes")
    llem.run()
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    return pytester


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _blocker(pytester: pytest.Pytester) -> Path:
    """A regular file standing where a folder's parent should be: creating a folder under it
    fails with ENOTDIR even for root, who ignores mode bits (these tests may run as root)."""
    blocker = pytester.path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker


@pytest.mark.parametrize(
    ("args", "ini", "named"),
    [
        (["--llem-report-dir=blocker/reports"], "", "--llem-report-dir"),
        ([], "llem_report_dir = blocker/reports", "ini option llem_report_dir"),
        (["--llem-save", "--llem-storage=blocker/store"], "", "--llem-storage"),
        (["--llem-save"], "llem_storage = blocker/store", "ini option llem_storage"),
        (["--llem-csv=blocker/out.csv"], "", "--llem-csv"),
    ],
)
def test_unwritable_output_folder_is_a_usage_error_before_any_case(
    project: pytest.Pytester, args: list[str], ini: str, named: str
):
    _blocker(project)
    if ini:
        project.makeini(f"[pytest]\n{ini}\n")
    project.makepyfile(CASE)
    result = project.runpytest(*QUICK, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*pytest-llem: {named}: cannot write in *blocker*"])
    assert not (project.path / "case-ran").exists()


def test_a_session_without_llem_cases_is_not_stopped_by_the_check(project: pytest.Pytester):
    # The plugin is installed for every project in the environment: a read-only checkout whose
    # tests use no llem case must run as if the plugin were not there.
    _blocker(project)
    project.makepyfile("def test_plain():\n    pass\n")
    result = project.runpytest("-p", "no:cacheprovider", "--llem-report-dir=blocker/reports")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK


def test_the_check_leaves_no_folder_behind(project: pytest.Pytester):
    project.makepyfile("def test_plain():\n    pass\n")
    result = project.runpytest(*QUICK, "--llem-report-dir=out/deep/reports", "--llem-save")
    assert result.ret == 0
    assert not (project.path / "out").exists()
    assert not (project.path / ".llem").exists()


def test_csv_may_not_overwrite_the_record(project: pytest.Pytester):
    project.makepyfile(CASE)
    result = project.runpytest(*QUICK, "--llem-csv=reports/llem-report.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--llem-csv: *llem-report.json is where the run writes its run record*"]
    )
    assert not (project.path / "case-ran").exists()


def test_a_failed_csv_write_fails_the_run_and_keeps_the_record(project: pytest.Pytester):
    # The folder is fine at start-up and gone by the end (a file takes its place mid-run).
    project.makepyfile(
        CASE
        + """
def test_later_the_csv_folder_becomes_a_file():
    pathlib.Path("out").write_text("not a folder any more")
"""
    )
    result = project.runpytest(*QUICK, "--llem-csv=out/table.csv")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*llem: cannot write the CSV table*"])
    record = json.loads((project.path / "reports" / "llem-report.json").read_text())
    assert [case["outcome"] for case in record["cases"]] == ["passed"]


def test_a_journal_that_cannot_be_written_is_shown_in_the_summary(project: pytest.Pytester):
    # runs/ checked writable at start-up, then a file takes its place before the case is
    # journalled; the record's timestamped copy fails too, which the summary already said.
    project.makepyfile(
        """
        import pathlib

        import pytest

        @pytest.mark.llem(num_prompts=2, max_new_tokens=2)
        def test_case(llem):
            llem.run()
            pathlib.Path("reports").mkdir(exist_ok=True)
            pathlib.Path("reports/runs").write_text("not a folder")
        """
    )
    result = project.runpytest(*QUICK)
    result.stdout.fnmatch_lines(["*llem benchmark summary*", "*llem: cannot write the journal*"])
    result.stdout.no_fnmatch_line("llem journal: *")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_a_run_writes_is_0644_under_umask_022(project: pytest.Pytester, umask_022):
    project.makepyfile(CASE)
    result = project.runpytest(*QUICK, "--llem-csv", "--llem-save=first")
    result.assert_outcomes(passed=1)
    reports = project.path / "reports"
    (copy,) = (reports / "runs").glob("llem-report-*.json")
    (journal,) = (reports / "runs").glob("llem-journal-*.jsonl")
    (saved,) = (project.path / ".llem").glob("*/0001_first_*.json")
    written = {
        "record": reports / "llem-report.json",
        "copy": copy,
        "journal": journal,
        "html": reports / "llem-report.html",
        "csv": reports / "llem-report.csv",
        "saved": saved,
    }
    assert {name: oct(_mode(path)) for name, path in written.items()} == dict.fromkeys(
        written, oct(0o644)
    )


def test_an_unwritable_default_folder_names_the_option_to_change(project: pytest.Pytester):
    (project.path / "reports").write_text("a file where the default report folder goes")
    project.makepyfile(CASE)
    result = project.runpytest(*QUICK)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*the default of --llem-report-dir: cannot write in *reports: it is a file*"]
    )


def _stand_in_config(**option: object) -> Any:
    return SimpleNamespace(option=SimpleNamespace(**option), stash=pytest.Stash())


@pytest.mark.parametrize(
    ("store", "workers", "explicit"),
    [
        (None, None, False),
        (SimpleNamespace(save=False, compare=None), None, False),
        (SimpleNamespace(save=True, compare=None), None, True),
        (SimpleNamespace(save=False, compare="latest"), None, True),
        (None, 2, True),  # an xdist controller never sees its workers' items
    ],
)
def test_an_explicit_llem_run_is_checked_at_once(store: Any, workers: Any, explicit: bool):
    config = _stand_in_config(numprocesses=workers)
    assert explicit_llem_run(config, SimpleNamespace(store=store)) is explicit  # type: ignore[arg-type]


def test_the_check_names_the_option_and_skips_workers_help_and_collect_only(tmp_path: Path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    folders = [(tmp_path / "fine", "--llem-report-dir"), (blocker / "store", "--llem-storage")]
    config = _stand_in_config()
    config.stash[OUTPUTS] = folders
    with pytest.raises(pytest.UsageError, match=r"pytest-llem: --llem-storage: cannot write"):
        check_outputs(config)
    for skipped in (_stand_in_config(help=True), _stand_in_config(collectonly=True)):
        skipped.stash[OUTPUTS] = folders
        check_outputs(skipped)
    worker = _stand_in_config()
    worker.workerinput = {"workerid": "gw0"}
    worker.stash[OUTPUTS] = folders
    check_outputs(worker)
    check_outputs(_stand_in_config())  # nothing recorded: nothing to check
