"""The ``llem`` fixture: resolve a case's config, run it on the session's backend and meters,
and record the result for the run record.

A test calls ``llem.run(**overrides)`` and gets a :class:`~pytest_llem.results.CaseResult`;
the result is also attached to the test's report (``user_properties``), so it reaches the run
record whether the test then passes, fails, or runs on an xdist worker.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_llem.collection import budget_rules, resolve_for
from pytest_llem.config.models import CaseConfig
from pytest_llem.data.workloads import PromptSet, build_prompt_set
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendNotAvailableError,
    ConfigurationError,
    LlemError,
    MeterUnavailableError,
    RetryableError,
)
from pytest_llem.harness.runner import WindowPolicy, run_case
from pytest_llem.harness.thermal import HOT_MARGIN_C, cool_down, measured_hot
from pytest_llem.harness.stats import distribution
from pytest_llem.harness.traffic import request_count
from pytest_llem.interop import record_benchmark
from pytest_llem.results.models import CaseError, CaseRecord, CaseResult, PromptsRecord
from pytest_llem.session import LlemSession

__all__ = ["CASE_PROPERTY", "SESSION_KEY", "LlemFixture", "llem", "llem_sweep_params"]

CASE_PROPERTY = "llem_case"
SESSION_KEY = pytest.StashKey[LlemSession]()


class LlemFixture:
    """What the ``llem`` fixture gives a test: its resolved config and ``run()``."""

    def __init__(
        self,
        item: pytest.Item,
        session: LlemSession,
        sweep: dict[str, Any] | None = None,
        request: pytest.FixtureRequest | None = None,
    ) -> None:
        self._item = item
        self._request = request
        self._session = session
        self._sweep = dict(sweep or {})
        self._runs = 0

    @property
    def config(self) -> CaseConfig:
        """The case's config as resolved from markers, ini and command line."""
        return resolve_for(self._item, self._session, {}, self._sweep)

    def run(self, **overrides: Any) -> CaseResult:
        """Run the benchmark case and return its result.

        Keyword arguments override the marker's parameters (the command line and ini still
        win). The result is recorded for the run record automatically.
        """
        self._runs += 1
        case_id = self._item.nodeid if self._runs == 1 else f"{self._item.nodeid}#{self._runs}"
        name = self._item.name if self._runs == 1 else f"{self._item.name}#{self._runs}"
        try:
            case = resolve_for(self._item, self._session, overrides, self._sweep)
        except ConfigurationError as e:
            self._record(CaseRecord(id=case_id, name=name, outcome="failed", error=_error(e)))
            pytest.fail(f"invalid llem parameters: {e}", pytrace=False)
        base = CaseRecord(
            id=case_id,
            name=name,
            params=case.model_dump(mode="json"),
            backend=case.backend,
            model=case.model,
            sweep=self._sweep,
        )
        try:
            result = self._measure(case, base)
        except LlemError as e:
            if _is_missing_hardware_or_engine(e):
                self._record(base.model_copy(update={"outcome": "skipped", "notes": [str(e)]}))
                pytest.skip(str(e))
            self._record(base.model_copy(update={"outcome": "failed", "error": _error(e)}))
            pytest.fail(f"{type(e).__name__}: {e}", pytrace=False)
        except Exception as e:
            self._record(base.model_copy(update={"outcome": "failed", "error": _error(e)}))
            raise
        self._record(CaseRecord(**{**result.model_dump(), "id": case_id, "name": name}))
        if self._request is not None and self._runs == 1:
            record_benchmark(self._request, result)
        self._check_budget(result)
        return result

    def _check_budget(self, result: CaseResult) -> None:
        from pytest_llem.results.gate import check_budget

        rules = budget_rules(self._item)
        store = self._session.options.store
        gate_estimated = store.gate_estimated if store is not None else False
        breaches = check_budget(result, rules, gate_estimated=gate_estimated) if rules else []
        if breaches:
            pytest.fail("llem budget exceeded:\n  " + "\n  ".join(breaches), pytrace=False)

    def _measure(self, case: CaseConfig, base: CaseRecord) -> CaseResult:
        """Measure the case; out of memory frees the model cache and tries once more."""
        attempts = 0
        while True:
            try:
                return self._measure_once(case, base)
            except RetryableError as e:
                attempts += 1
                self._session.backends.close()
                if attempts > e.max_retries:
                    raise
                self._session.progress(
                    f"{base.name}: {e}; freed the model cache, retrying ({attempts}/"
                    f"{e.max_retries})"
                )

    def _measure_once(self, case: CaseConfig, base: CaseRecord) -> CaseResult:
        session = self._session
        meters, meter_records = session.meters.get()
        assignment = session.meters.assignment
        baseline = (
            session.baseline.get(meters, meter_records, assignment)
            if session.baseline is not None
            else None
        )
        backend, info, load = session.backends.get(case)
        prompt_set = build_prompt_set(case, backend, count=_request_count(case))
        energy = session.options.energy
        idle_temperatures = baseline.idle_temperature_c if baseline is not None else {}
        cooldown = cool_down(
            meters,
            mode=energy.cooldown.mode,
            seconds=energy.cooldown.seconds,
            idle_temperatures=idle_temperatures,
        )
        policy = WindowPolicy.for_meters(
            min_window_s=energy.min_window_s if assignment.meters else 0.0,
            update_periods=[r.update_period_s for r in meter_records if r.used_for],
        )
        measurement = run_case(
            backend=backend,
            meters=meters,
            config=case,
            requests=prompt_set.requests,
            non_embedding_parameters=info.non_embedding_parameters,
            policy=policy,
            baseline=baseline,
            assignment=assignment.meters,
        )
        notes = list(measurement.notes)
        if baseline is None and session.baseline is not None and session.baseline.problem:
            notes.append(session.baseline.problem)
        hot = measured_hot(measurement.repetitions, idle_temperatures)
        if hot:
            notes.append(
                f"measured hot: a window started more than {HOT_MARGIN_C:g} C above idle "
                "temperature (try --llem-cooldown=temperature)"
            )
        backend_info = {k: v for k, v in vars(info).items() if v is not None and v != {}}
        return CaseResult(
            params=base.params,
            backend=case.backend,
            model=case.model,
            backend_info=backend_info,
            meters=meter_records,
            metrics=measurement.metrics,
            latency=measurement.latency,
            repetitions=measurement.repetitions,
            load=load,
            prompts=_prompts_record(prompt_set),
            sweep=base.sweep,
            warmup=case.warmup,
            notes=notes,
            baseline=baseline,
            cooldown=cooldown,
            measured_hot=hot,
        )

    def _record(self, record: CaseRecord) -> None:
        self._item.user_properties.append((CASE_PROPERTY, record.model_dump(mode="json")))


def _request_count(case: CaseConfig) -> int:
    """Prompts to prepare: the server scenario's request count, else ``num_prompts``."""
    if case.scenario == "server":
        return request_count(case.traffic, case.num_prompts) or case.num_prompts
    return case.num_prompts


def _prompts_record(prompt_set: PromptSet) -> PromptsRecord:
    return PromptsRecord(
        source=prompt_set.source,
        requests=len(prompt_set.requests),
        overflow=prompt_set.overflow,
        truncated=prompt_set.truncated,
        filtered=prompt_set.filtered,
        input_tokens=distribution([float(n) for n in prompt_set.input_lengths], unit="tokens"),
        notes=list(prompt_set.notes),
    )


def _is_missing_hardware_or_engine(error: LlemError) -> bool:
    """Errors that make a case skip rather than fail: a meter that cannot measure here, an
    engine that is not installed, a device (``device=cuda``) this machine does not have."""
    if isinstance(error, (MeterUnavailableError, BackendNotAvailableError)):
        return True
    return isinstance(error, BackendConfigError) and error.param == "device"


def _error(error: BaseException) -> CaseError:
    return CaseError(type=type(error).__name__, message=str(error))


@pytest.fixture
def llem_sweep_params() -> dict[str, Any]:
    """The values of this test's sweep combination, by parameter path (empty without a sweep).

    ``@pytest.mark.llem_sweep`` and ``--llem-sweep`` parametrize it; the ``llem`` fixture
    applies them.
    """
    return {}


@pytest.fixture
def llem(request: pytest.FixtureRequest, llem_sweep_params: dict[str, Any]) -> LlemFixture:
    """Run an LLM inference energy benchmark: ``result = llem.run()``.

    Parameters come from ``@pytest.mark.llem(...)``, ``@pytest.mark.llem_sweep(...)``,
    ``llem.run(**overrides)``, the ini keys and the ``--llem-*`` options.
    ``result["energy_per_output_token_j"].median`` and friends give each metric's summary over
    the measured repetitions.
    """
    session = request.config.stash[SESSION_KEY]
    item = request.node
    assert isinstance(item, pytest.Item)
    return LlemFixture(item, session, llem_sweep_params, request)
