"""The case runner (``harness.case``) run directly, with no pytest fixture in between.

The session's pieces are small stand-ins written to the runner's Protocols, over the fake
backend and the fake meter on the real clock (the fake backend's script waits it out, so the
runner's window and the meter's agree).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pytest_llem.backends.base import Backend, BackendInfo
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import (
    MeterUnavailableError,
    RetryableError,
)
from pytest_llem.harness.case import (
    BUDGET_EXCEEDED,
    CaseOutcome,
    CaseRunner,
    CaseSettings,
    start_record,
)
from pytest_llem.meters.base import EnergyMeter, ProcessesUnknown
from pytest_llem.meters.registry import DomainAssignment
from pytest_llem.results.gate import parse_budget
from pytest_llem.results.models import BaselineRecord, LoadRecord, MeterRecord
from tests.fakes.fake_backend import FakeBackend, WallClock
from tests.fakes.fake_meter import FakeMeter

REPO = Path(__file__).resolve().parent.parent

#: A case small enough to run in well under a second on the fake backend's script.
CASE = {"num_prompts": 3, "batch_size": 3, "max_new_tokens": 4, "warmup": 1, "repeat": 2}


class Backends:
    """A one-model backend cache: loads on first use, reuses after, counts closes."""

    def __init__(self, make: Callable[[], Backend]) -> None:
        self._make = make
        self.backend: Backend | None = None
        self.info: BackendInfo | None = None
        self.loads = 0
        self.closes = 0

    def get(self, case: CaseConfig) -> tuple[Backend, BackendInfo, LoadRecord]:
        del case
        if self.backend is not None and self.info is not None:
            return self.backend, self.info, LoadRecord(reused=True, seconds=0.0)
        self.backend = self._make()
        self.info = self.backend.load()
        self.loads += 1
        return self.backend, self.info, LoadRecord(reused=False, seconds=0.0)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend, self.info = None, None
        self.closes += 1


class Meters:
    """The session's meters: one GPU meter, or an error raised on first use."""

    def __init__(self, meter: EnergyMeter | None, error: Exception | None = None) -> None:
        self._meter = meter
        self._error = error
        self.assignment = DomainAssignment()

    def get(self) -> tuple[list[EnergyMeter], list[MeterRecord]]:
        if self._error is not None:
            raise self._error
        assert self._meter is not None
        self.assignment = DomainAssignment(meters={"gpu": self._meter.name})
        record = MeterRecord(
            name=self._meter.name,
            domains=["gpu"],
            sources={"gpu": "measured"},
            used_for=["gpu"],
            devices=["gpu0"],
        )
        return [self._meter], [record]


class NoBaseline:
    """A session whose idle baseline could not be measured."""

    problem: str | None = "no idle baseline in this test"

    def get(
        self,
        meters: Sequence[EnergyMeter],
        records: Sequence[MeterRecord],
        assignment: DomainAssignment,
    ) -> BaselineRecord | None:
        del meters, records, assignment
        return None


class ListingMeter(FakeMeter):
    """A fake GPU meter that can list the compute processes on its GPU."""

    def __init__(self, clock: WallClock, pids: Sequence[int] | None) -> None:
        super().__init__("gpu-fake", clock, power_w={"gpu": 200.0})
        self.pids = pids

    def running_processes(self) -> dict[str, list[tuple[int, float | None]] | ProcessesUnknown]:
        if self.pids is None:
            return {"gpu0": ProcessesUnknown("the driver does not say")}
        return {"gpu0": [(pid, 100.0) for pid in self.pids]}


def _runner(
    *,
    backend: Callable[[WallClock], Backend] | None = None,
    meter: EnergyMeter | None = None,
    meter_error: Exception | None = None,
    settings: CaseSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[CaseRunner, Backends]:
    clock = WallClock()
    make = backend or (lambda c: FakeBackend(c, prefill_s=0.002, step_s=0.001))
    backends = Backends(lambda: make(clock))
    gpu = meter if meter is not None else FakeMeter("gpu-fake", clock, power_w={"gpu": 200.0})
    runner = CaseRunner(
        backends=backends,
        meters=Meters(None if meter_error else gpu, meter_error),
        baseline=NoBaseline(),
        settings=settings,
        progress=progress or (lambda message: None),
    )
    return runner, backends


def _run(runner: CaseRunner, case_id: str = "case-1", **budget: float) -> CaseOutcome:
    case = CaseConfig(**CASE)
    base = start_record(case, case_id=case_id, name="case", notes=["from the caller"])
    return runner.run(case, base, budget=parse_budget(budget) if budget else ())


def test_a_case_runs_to_a_record_without_pytest():
    runner, backends = _runner()
    outcome = _run(runner)
    assert outcome.skip_reason is None
    assert outcome.failure is None
    assert outcome.exception is None
    record, result = outcome.record, outcome.result
    assert result is not None
    assert (record.id, record.name, record.outcome) == ("case-1", "case", "passed")
    # The record keeps what the backend chose for ``auto``, and says what was asked.
    asked = CaseConfig(**CASE).model_dump(mode="json")
    assert record.params == {**asked, "device": "cpu", "dtype": "float32"}
    assert "asked for device=auto, dtype=auto; ran with device=cpu, dtype=float32" in record.notes
    assert record.metrics == result.metrics
    # Each window's figures are per run of the workload: 3 prompts x 4 tokens.
    tokens = record.metrics["output_tokens"]
    assert tokens.n == CASE["repeat"]
    assert tokens.median == 3 * 4
    assert record.metrics["gpu_energy_j"].n == CASE["repeat"]
    assert record.metrics["gpu_energy_j"].median > 0
    assert record.meters[0].name == "gpu-fake"
    assert record.prompts.requests == 3
    assert record.backend_info["name"] == "fake"
    assert record.load.reused is False
    # The caller's notes come first; the missing baseline is said, not silently dropped.
    assert record.notes[0] == "from the caller"
    assert "no idle baseline in this test" in record.notes
    assert backends.loads == 1
    assert backends.closes == 0
    again = _run(runner, "case-2")
    assert again.record.load.reused is True
    assert backends.loads == 1


def test_a_meter_that_cannot_measure_skips_the_case_before_loading():
    runner, backends = _runner(meter_error=MeterUnavailableError("nvml", "no NVIDIA driver"))
    outcome = _run(runner)
    assert outcome.record.outcome == "skipped"
    assert outcome.result is None
    assert outcome.skip_reason is not None
    assert "no NVIDIA driver" in outcome.skip_reason
    assert outcome.record.notes == [outcome.skip_reason, "from the caller"]
    assert backends.loads == 0


def test_a_failing_engine_fails_the_case_and_frees_the_model():
    runner, backends = _runner(
        backend=lambda c: FakeBackend(c, prefill_s=0.002, step_s=0.001, fail_on_call=1)
    )
    outcome = _run(runner)
    assert outcome.record.outcome == "failed"
    assert outcome.exception is None
    assert outcome.record.error is not None
    assert outcome.record.error.type == "BackendInferenceError"
    assert outcome.failure == "BackendInferenceError: scripted failure"
    assert backends.closes == 1
    assert backends.backend is None


class Crashing(FakeBackend):
    def generate(self, *args: object, **kwargs: object) -> list:  # type: ignore[override]
        raise ZeroDivisionError("a bug, not an engine fault")


def test_an_unexpected_error_is_handed_back_for_the_caller_to_raise():
    runner, backends = _runner(backend=lambda c: Crashing(c))
    outcome = _run(runner)
    assert isinstance(outcome.exception, ZeroDivisionError)
    assert outcome.record.outcome == "failed"
    assert outcome.record.error is not None
    assert outcome.record.error.type == "ZeroDivisionError"
    assert backends.closes == 1


class OutOfMemoryOnce(FakeBackend):
    failures = 0

    def generate(self, *args: object, **kwargs: object) -> list:  # type: ignore[override]
        if OutOfMemoryOnce.failures == 0:
            OutOfMemoryOnce.failures += 1
            raise RetryableError("out of memory", max_retries=1)
        return super().generate(*args, **kwargs)  # type: ignore[arg-type]


def test_out_of_memory_frees_the_model_and_retries_once():
    OutOfMemoryOnce.failures = 0
    said: list[str] = []
    runner, backends = _runner(
        backend=lambda c: OutOfMemoryOnce(c, prefill_s=0.002, step_s=0.001),
        progress=said.append,
    )
    outcome = _run(runner)
    assert outcome.record.outcome == "passed"
    assert backends.loads == 2
    assert backends.closes == 1
    assert said == ["case: out of memory; freed the model cache, retrying (1/1)"]


def test_a_breached_budget_fails_the_case_with_its_result():
    runner, _ = _runner()
    outcome = _run(runner, gpu_energy_j=1e-12)
    assert outcome.result is not None
    assert outcome.record.outcome == "failed"
    assert outcome.record.error is not None
    assert outcome.record.error.type == BUDGET_EXCEEDED
    assert outcome.failure is not None
    assert "gpu_energy_j" in outcome.failure
    held = _run(runner, "case-2", gpu_energy_j=1e9)
    assert held.record.outcome == "passed"
    assert held.failure is None


@pytest.mark.parametrize(("mode", "outcome"), [("skip", "skipped"), ("fail", "failed")])
def test_a_foreign_process_on_the_gpu_skips_or_fails_as_told(mode: str, outcome: str):
    clock = WallClock()
    meter = ListingMeter(clock, pids=[os.getpid(), 999_999_999])
    runner, backends = _runner(meter=meter, settings=CaseSettings(isolation=mode))
    result = _run(runner)
    assert result.record.outcome == outcome
    assert result.result is None
    assert result.record.isolation is not None
    assert [p.pid for p in result.record.isolation.foreign] == [999_999_999]
    assert "pid 999999999 on gpu0" in result.record.notes[0]
    assert (result.skip_reason is not None) == (mode == "skip")
    assert (result.failure is not None) == (mode == "fail")
    assert backends.loads == 0  # nothing was loaded onto a GPU that is not ours


def test_under_warn_isolation_problems_become_notes():
    clock = WallClock()
    runner, _ = _runner(meter=ListingMeter(clock, pids=None))
    outcome = _run(runner)
    assert outcome.record.outcome == "passed"
    assert outcome.record.isolation is not None
    assert not outcome.record.isolation.checked
    assert any("could not be checked" in note for note in outcome.record.notes)


def test_shared_domains_are_flagged_on_the_case_and_its_figure():
    runner, _ = _runner()
    case = CaseConfig(**CASE)
    base = start_record(case, case_id="c", name="c", worker="gw0", shared_domains=["gpu", "cpu"])
    record = runner.run(case, base).record
    # Only the domains this case measures are shared; the figure says so too.
    assert record.shared_domains == ["gpu"]
    assert record.worker == "gw0"
    assert record.metrics["gpu_energy_j"].note is not None
    assert any(note.startswith("gpu: shared by every xdist worker") for note in record.notes)


def test_importing_the_case_runner_does_not_import_pytest():
    code = (
        "import sys, pytest_llem.harness.case; "
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest')); "
        "print(leaked); sys.exit(1 if leaked else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
