"""A worker that dies while running a case (a CUDA fault, the out-of-memory killer) costs that
case alone: it runs once, is recorded as an error saying so, and the rest of its model-load
group still runs, on a worker that loads the model again. Real xdist in pytester, with a fake
backend whose loads and cases are counted in files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_llem.recorder import WORKER_CRASHED, crashed_case, worker_exit
from pytest_llem.results.models import CaseRecord

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
QUICK = ["-p", "no:cacheprovider", "--llem-warmup=0", "--llem-repeat=1", "--llem-baseline-s=0"]

CONFTEST = """
import os
import time

from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter

LOG = os.environ["LLEM_CRASH_LOG"]


def log(line):
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(line + "\\n")


class Counted(FakeBackend):
    def __init__(self, model):
        super().__init__(FakeClock())
        self.model = model

    def load(self):
        log(f"load {self.model} {os.environ.get('PYTEST_XDIST_WORKER')}")
        return super().load()


def pytest_llem_backend_names():
    return ["counted"]


def pytest_llem_meter_names():
    return ["steady"]


def pytest_llem_make_backend(name, case, progress):
    return Counted(case.model) if name == "counted" else None


def pytest_llem_make_meter(name, config, options):
    if name == "steady":
        return FakeMeter("steady", time.perf_counter, power_w={"cpu": 10.0})
    return None
"""

CASES = """
import os
import signal

import pytest

CASE = dict(backend="counted", batch_size=2, max_new_tokens=2, num_prompts=2)


@pytest.mark.llem(model="group-a", **CASE)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_a(llem, n):
    with open(os.environ["LLEM_CRASH_LOG"], "a", encoding="utf-8") as f:
        f.write(f"run test_a[{n}]\\n")
    if n == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as a CUDA fault or the OOM killer would
    llem.run()


@pytest.mark.llem(model="group-b", **CASE)
@pytest.mark.parametrize("n", [1, 2])
def test_b(llem, n):
    with open(os.environ["LLEM_CRASH_LOG"], "a", encoding="utf-8") as f:
        f.write(f"run test_b[{n}]\\n")
    llem.run()
"""


@pytest.fixture
def crash_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file cases and loads append to; workers import ``tests.fakes`` from the repo."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{path}" if path else str(REPO))
    log = tmp_path / "crash.log"
    monkeypatch.setenv("LLEM_CRASH_LOG", str(log))
    return log


@pytest.mark.slow
def test_a_case_that_kills_its_worker_runs_once_and_is_an_error(
    pytester: pytest.Pytester, crash_log: Path
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_crash=CASES)
    result = pytester.runpytest(*QUICK, "--llem-meter=steady", "-n", "2")
    result.assert_outcomes(passed=5, failed=1)
    lines = crash_log.read_text().splitlines()
    assert lines.count("run test_a[2]") == 1, lines  # not once per replacement worker
    for n in (1, 3, 4):
        assert lines.count(f"run test_a[{n}]") == 1
    # group-a's model is loaded again by whichever worker runs the rest of the group
    assert len([line for line in lines if line.startswith("load group-a")]) == 2
    assert len([line for line in lines if line.startswith("load group-b")]) == 1

    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    cases = {case["name"]: case for case in record["cases"]}
    assert sorted(cases) == [f"test_a[{n}]" for n in (1, 2, 3, 4)] + ["test_b[1]", "test_b[2]"]
    crashed = cases["test_a[2]"]
    assert crashed["id"] == "test_crash.py::test_a[2]"
    assert crashed["outcome"] == "error"
    assert crashed["error"]["type"] == WORKER_CRASHED
    message = crashed["error"]["message"]
    assert "crashed while running this case (killed by signal 9 (SIGKILL))" in message
    assert "not run again" in message
    # the controller recorded it from what the worker sent as the case started
    assert (crashed["backend"], crashed["model"]) == ("counted", "group-a")
    assert crashed["params"]["batch_size"] == 2
    assert crashed["worker"] in {"gw0", "gw1"}
    others = [case for name, case in cases.items() if name != "test_a[2]"]
    assert all(case["outcome"] == "passed" for case in others)
    reloaded = [cases[f"test_a[{n}]"]["load"]["reused"] for n in (3, 4)]
    assert False in reloaded  # the first case after the crash loaded the model again
    result.stdout.fnmatch_lines(["*test_a[[]2[]]*WorkerCrashed*"])
    html = (pytester.path / "reports" / "llem-report.html").read_text()
    assert "WorkerCrashed: worker &#39;gw" in html or "WorkerCrashed: worker 'gw" in html
    (journal,) = (pytester.path / "reports" / "runs").glob("llem-journal-*.jsonl")
    assert WORKER_CRASHED in journal.read_text()


def _session(*cases: CaseRecord) -> Any:
    return SimpleNamespace(cases=list(cases))


def test_a_crash_without_start_facts_is_still_recorded() -> None:
    case = crashed_case("t.py::test_x", None, worker="gw3", how="exit status 1", session=_session())
    assert case is not None
    assert (case.id, case.name, case.outcome) == ("t.py::test_x", "test_x", "error")
    assert case.error is not None
    assert case.error.message == (
        "worker 'gw3' crashed while running this case (exit status 1); not run again"
    )
    assert any("before the case started" in note for note in case.notes)
    assert (
        crashed_case("t.py::y", None, worker="gw3", how="?", session=_session(), llem=False) is None
    )


def test_a_crash_after_the_case_was_recorded_adds_a_note_only() -> None:
    done = CaseRecord(id="t.py::test_x", name="test_x")
    session = _session(done)
    assert crashed_case("t.py::test_x", None, worker="gw0", how="?", session=session) is None
    assert done.outcome == "passed"
    assert "after the case was recorded" in done.notes[0]


def test_how_a_worker_ended() -> None:
    def node(code: int | None) -> Any:
        popen = SimpleNamespace(wait=lambda timeout: code)
        return SimpleNamespace(gateway=SimpleNamespace(_io=SimpleNamespace(popen=popen)))

    assert worker_exit(node(-9)) == "killed by signal 9 (SIGKILL)"
    assert worker_exit(node(3)) == "exit status 3"
    assert worker_exit(node(None)) == "its exit status is unknown"
    assert worker_exit(None) == "its exit status is unknown"


class _Node:
    """The part of xdist's WorkerController the scheduler uses."""

    def __init__(self, collection: list[str]) -> None:
        self.shutting_down = False
        self.collection = collection
        self.sent: list[str] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.extend(self.collection[i] for i in indices)

    def shutdown(self) -> None:
        self.shutting_down = True


def test_the_scheduler_hands_out_the_rest_of_a_crashed_group_but_not_the_crashed_case(
    tmp_path: Path,
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    from collections import OrderedDict

    from pytest_llem.load_group_scheduler import ModelGroupScheduling

    collection = ["t.py::a1", "t.py::a2", "t.py::a3", "t.py::b1", "t.py::other"]
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"t.py::a1": "A", "t.py::a2": "A", "t.py::a3": "A"}))
    scheduler = ModelGroupScheduling.__new__(ModelGroupScheduling)
    scheduler._groups_file, scheduler._groups = groups, None
    scheduler.log = lambda *args: None
    scheduler.workqueue = OrderedDict()
    crashed, other = _Node(collection), _Node(collection)
    scheduler.registered_collections = {crashed: collection, other: collection}
    scheduler.assigned_work = {
        crashed: {"A": {"t.py::a1": True, "t.py::a2": False, "t.py::a3": False}},
        other: {"t.py::b1": {"t.py::b1": True}},
    }
    assert scheduler.load_group("t.py::a2") == "A"
    assert scheduler.load_group("t.py::other") is None
    assert scheduler.remove_node(crashed) == "t.py::a2"
    assert other.sent == ["t.py::a3"]  # the rest of group A, reloading its model there
    assert scheduler.assigned_work[other]["A"] == {
        "t.py::a1": True,
        "t.py::a2": True,
        "t.py::a3": False,
    }
    finished = _Node(collection)
    scheduler.assigned_work[finished] = {"t.py::b1": {"t.py::b1": True}}
    assert scheduler.remove_node(finished) is None


@pytest.mark.slow
def test_under_plain_load_distribution_the_crashed_case_is_recorded_too(
    pytester: pytest.Pytester, crash_log: Path
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_crash=CASES)
    result = pytester.runpytest(*QUICK, "--llem-meter=steady", "-n", "2", "--dist=load")
    result.assert_outcomes(passed=5, failed=1)
    assert crash_log.read_text().splitlines().count("run test_a[2]") == 1
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    (crashed,) = [case for case in record["cases"] if case["outcome"] == "error"]
    assert crashed["name"] == "test_a[2]"
    assert crashed["error"]["type"] == WORKER_CRASHED
    assert crashed["model"] == "group-a"
