"""The ``llem`` fixture: resolve a case's config, run it on the session's backend and meters,
and record the result for the run record.

A test calls ``llem.run(**overrides)`` and gets a :class:`~pytest_llem.results.CaseResult`;
the result is also attached to the test's report (``user_properties``), so it reaches the run
record whether the test then passes, fails, or runs on an xdist worker.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest

from pytest_llem.backends.base import BackendInfo
from pytest_llem.collection import (
    budget_rules,
    case_node_id,
    overruled_overrides,
    resolve_for,
    skipped_params,
    sweep_case_of,
    sweep_conflict,
    sweep_mismatch,
)
from pytest_llem.config.models import CaseConfig
from pytest_llem.config.resolve import check_value
from pytest_llem.data.workloads import PromptSet, build_prompt_set
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendNotAvailableError,
    ConfigurationError,
    GpuNotIsolatedError,
    LlemError,
    MeterUnavailableError,
    NotEnoughGpusError,
    RetryableError,
)
from pytest_llem.harness.deadline import deadline
from pytest_llem.harness.isolation import check_isolation, unchecked_note
from pytest_llem.harness.runner import WindowPolicy, run_case
from pytest_llem.harness.thermal import HOT_MARGIN_C, cool_down, measured_hot
from pytest_llem.harness.traffic import request_count
from pytest_llem.interop import record_benchmark
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.results.models import (
    CaseError,
    CaseRecord,
    CaseResult,
    IsolationRecord,
    MeterRecord,
    MetricSummary,
    PromptsRecord,
)
from pytest_llem.results.stats import distribution
from pytest_llem.session import LlemSession
from pytest_llem.sweep import SweepCase
from pytest_llem.workers import SHARED_DOMAINS, worker_info

__all__ = [
    "BUDGET_EXCEEDED",
    "CASE_PROPERTY",
    "SESSION_KEY",
    "LlemFixture",
    "llem",
    "llem_sweep_params",
    "record_test_failure",
    "skipped_sweep_case",
]

logger = logging.getLogger("pytest_llem")

CASE_PROPERTY = "llem_case"
SESSION_KEY = pytest.StashKey[LlemSession]()
#: ``error.type`` of a case whose ``@pytest.mark.llem_budget`` limits were breached.
BUDGET_EXCEEDED = "BudgetExceeded"


class LlemFixture:
    """What the ``llem`` fixture gives a test: its resolved config and ``run()``."""

    def __init__(
        self,
        item: pytest.Item,
        session: LlemSession,
        sweep: SweepCase | None = None,
        request: pytest.FixtureRequest | None = None,
    ) -> None:
        self._item = item
        self._request = request
        self._session = session
        self._sweep = sweep
        self._runs = 0

    @property
    def config(self) -> CaseConfig:
        """The case's config as resolved from markers, ini and command line."""
        return resolve_for(self._item, self._session, {}, self._sweep)

    def run(self, **overrides: Any) -> CaseResult:
        """Run the benchmark case and return its result.

        Keyword arguments override the ``llem`` markers and a marker sweep's values; the ini
        keys and the command line (their sweeps included) still win, and an override that
        contradicts a marker sweep's value in the test id fails the case. The result is
        recorded for the run record automatically.
        """
        self._runs += 1
        node_id = case_node_id(self._item)
        case_id = node_id if self._runs == 1 else f"{node_id}#{self._runs}"
        name = self._item.name if self._runs == 1 else f"{self._item.name}#{self._runs}"
        case, base = self._resolve(overrides, CaseRecord(id=case_id, name=name))
        try:
            result = self._measure(case, base)
        except GpuNotIsolatedError as e:
            outcome = "skipped" if self._session.options.isolation == "skip" else "failed"
            update = {"outcome": outcome, "isolation": e.isolation, "notes": [str(e), *base.notes]}
            if outcome == "failed":
                update["error"] = _error(e)
            self._record(base.model_copy(update=update))
            if outcome == "skipped":
                pytest.skip(str(e))
            pytest.fail(f"{type(e).__name__}: {e}", pytrace=False)
        except LlemError as e:
            if _is_missing_hardware_or_engine(e):
                skipped = {"outcome": "skipped", "notes": [str(e), *base.notes]}
                self._record(base.model_copy(update=skipped))
                pytest.skip(str(e))
            self._session.backends.close()  # a failed case leaves no half-used model behind
            self._record(base.model_copy(update={"outcome": "failed", "error": _error(e)}))
            pytest.fail(f"{type(e).__name__}: {e}", pytrace=False)
        except Exception as e:
            self._session.backends.close()
            self._record(base.model_copy(update={"outcome": "failed", "error": _error(e)}))
            raise
        breaches = self._budget_breaches(result)
        record = CaseRecord(**{**result.model_dump(), "id": base.id, "name": base.name})
        if breaches:
            record.outcome = "failed"
            record.error = CaseError(type=BUDGET_EXCEEDED, message="; ".join(breaches))
        self._record(record)
        if self._request is not None and self._runs == 1:
            record_benchmark(self._request, result)
        if breaches:
            pytest.fail("llem budget exceeded:\n  " + "\n  ".join(breaches), pytrace=False)
        return result

    def _resolve(
        self, overrides: dict[str, Any], identity: CaseRecord
    ) -> tuple[CaseConfig, CaseRecord]:
        """The case's config and the start of its record; a config that cannot run under its
        test id is recorded as failed and fails the test."""
        swept = dict(self._sweep.values) if self._sweep is not None else {}
        try:
            conflict = sweep_conflict(overrides, self._sweep)
            if conflict is not None:
                raise ConfigurationError(conflict)
            case = resolve_for(self._item, self._session, overrides, self._sweep)
            mismatch = sweep_mismatch(case, self._sweep)
            if mismatch is not None:
                raise ConfigurationError(mismatch)
        except ConfigurationError as e:
            failed = {"outcome": "failed", "error": _error(e), "sweep": swept}
            self._record(identity.model_copy(update=failed))
            pytest.fail(f"invalid llem parameters: {e}", pytrace=False)
        base = identity.model_copy(
            update={
                "params": case.model_dump(mode="json"),
                "backend": case.backend,
                "model": case.model,
                "sweep": swept,
                "notes": overruled_overrides(overrides, self._session, self._sweep),
                **self._placement(),
            }
        )
        return case, base

    def _placement(self) -> dict[str, Any]:
        """Where the case runs: its xdist worker, its GPUs, the domains it shares."""
        worker = worker_info(getattr(self._item.config, "workerinput", None))
        shared = list(SHARED_DOMAINS) if worker.count > 1 else []
        return {
            "worker": worker.id,
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "shared_domains": shared,
        }

    def _budget_breaches(self, result: CaseResult) -> list[str]:
        from pytest_llem.results.gate import check_budget

        rules = budget_rules(self._item)
        store = self._session.options.store
        gate_estimated = store.gate_estimated if store is not None else False
        return check_budget(result, rules, gate_estimated=gate_estimated) if rules else []

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
        _check_gpu_count(case)
        isolation = self._check_isolation(meters, assignment.meters)
        backend, info, load = session.backends.get(case)
        params, asked = _as_ran(base.params, info)
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
            min_window_s=energy.min_window_s,
            update_periods=[r.update_period_s for r in meter_records if r.used_for],
        )
        timeout_s = session.options.timeout_s
        # Only the case's own work counts against --llem-timeout-s: the idle baseline, the
        # model load and the cooldown above are the session's, and may take any time.
        with deadline(timeout_s) as armed:
            measurement = run_case(
                backend=backend,
                meters=meters,
                config=case,
                requests=prompt_set.requests,
                non_embedding_parameters=info.non_embedding_parameters,
                policy=policy,
                baseline=baseline,
                assignment=assignment.meters,
                baseline_problem=session.baseline.problem if session.baseline is not None else None,
            )
        notes = [*base.notes, *asked, *measurement.notes]
        if timeout_s and not armed:
            notes.append(
                f"--llem-timeout-s={timeout_s:g} cannot interrupt a case here "
                "(no SIGALRM on this thread)"
            )
        if baseline is None and session.baseline is not None and session.baseline.problem:
            notes.append(session.baseline.problem)
        shared = [d for d in base.shared_domains if d in assignment.meters]
        notes.extend(_flag_shared(measurement.metrics, shared))
        if isolation is not None:
            notes.extend(_isolation_notes(isolation))
        extra_gpus = _unused_gpus_note(case, info.device, meter_records, assignment.meters)
        if extra_gpus is not None:
            notes.append(extra_gpus)
            logger.warning("llem: %s", extra_gpus)
        hot = measured_hot(measurement.repetitions, idle_temperatures)
        if hot:
            notes.append(
                f"measured hot: a window started more than {HOT_MARGIN_C:g} C above idle "
                "temperature (try --llem-cooldown=temperature)"
            )
        backend_info = {k: v for k, v in vars(info).items() if v is not None and v != {}}
        return CaseResult(
            params=params,
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
            isolation=isolation,
            worker=base.worker,
            visible_devices=base.visible_devices,
            shared_domains=shared,
        )

    def _check_isolation(
        self, meters: list[EnergyMeter], assignment: dict[str, str]
    ) -> IsolationRecord | None:
        """Look for foreign processes on the measured GPUs; raise when told to skip or fail.

        A GPU that could not be checked counts as not isolated: isolation is not established.
        """
        if "gpu" not in assignment:
            return None
        mode = self._session.options.isolation
        isolation = check_isolation(meters, mode=mode)
        problems = _isolation_notes(isolation) if isolation is not None else []
        if not problems:
            return isolation
        if mode != "warn":
            raise GpuNotIsolatedError("; ".join(problems), isolation=isolation)
        for problem in problems:
            logger.warning("llem: %s", problem)
        return isolation

    def _record(self, record: CaseRecord) -> None:
        self._item.user_properties.append((CASE_PROPERTY, record.model_dump(mode="json")))


def record_test_failure(properties: list[tuple[str, object]], error: CaseError) -> None:
    """Give the cases a test recorded as passed the error that then failed the test (an
    ``assert`` after ``llem.run``, say): the record must not show a failed case without why.

    Args:
        properties: The test report's ``user_properties``; its case entries are updated.
        error: The failure's type and one-line message.
    """
    for name, value in properties:
        if name != CASE_PROPERTY or not isinstance(value, dict):
            continue
        if value.get("outcome") == "passed" and value.get("error") is None:
            value["outcome"] = "failed"
            value["error"] = error.model_dump(mode="json")


def skipped_sweep_case(item: pytest.Item, session: LlemSession) -> dict[str, Any] | None:
    """The run-record entry of a sweep combination skipped at collection (a rule forbids it, or
    it needs a GPU that is not there), or None when ``item`` is no such combination.

    It never reaches ``llem.run``, so without this the grid would have a hole in every report.
    """
    sweep = sweep_case_of(item)
    if sweep is None or sweep.skip_reason is None:
        return None
    params = skipped_params(item, session, sweep)
    record = CaseRecord(
        id=case_node_id(item),
        name=item.name,
        outcome="skipped",
        params=params,
        backend=str(params.get("backend") or ""),
        model=str(params.get("model") or ""),
        sweep=dict(sweep.values),
        notes=[sweep.skip_reason],
    )
    return record.model_dump(mode="json")


#: Parameters a backend resolves when it loads (``auto``): the record keeps what it chose.
RESOLVED_AT_LOAD = ("device", "dtype")


def _as_ran(params: dict[str, Any], info: BackendInfo) -> tuple[dict[str, Any], list[str]]:
    """The case's parameters with the device and dtype the backend loaded with, and a note
    saying what was asked when that differs. A value the parameter cannot take (an endpoint's
    ``server``: the plugin cannot know) leaves the asked one in place."""
    ran = dict(params)
    asked, chosen = [], []
    for name in RESOLVED_AT_LOAD:
        value = getattr(info, name, None)
        if value is None or value == params.get(name):
            continue
        try:
            check_value(name, value)
        except ConfigurationError:
            continue
        ran[name] = value
        asked.append(f"{name}={params.get(name)}")
        chosen.append(f"{name}={value}")
    if not asked:
        return ran, []
    return ran, [f"asked for {', '.join(asked)}; ran with {', '.join(chosen)}"]


def gpus_needed(case: CaseConfig) -> int:
    """GPUs a case's engine asks for: tensor x pipeline parallel size of its backend's group."""
    group = getattr(case, case.backend, None)
    tensor = int(getattr(group, "tensor_parallel_size", 1) or 1)
    pipeline = int(getattr(group, "pipeline_parallel_size", 1) or 1)
    return tensor * pipeline


def _check_gpu_count(case: CaseConfig) -> None:
    """Skip a multi-GPU case on a process that sees fewer GPUs (``--llem-gpus=0-1,2-3``)."""
    needed = gpus_needed(case)
    if needed <= 1 or case.device == "cpu":
        return
    from pytest_llem.meters.nvml import nvml_gpus

    gpus, why = nvml_gpus()
    if len(gpus) < needed:
        seen = f"{len(gpus)} GPU(s)" if gpus else f"no GPU ({why})"
        raise NotEnoughGpusError(
            case.backend,
            "tensor_parallel_size",
            f"the case needs {needed} GPUs (tensor x pipeline parallel) but this process sees "
            f"{seen}; give each xdist worker a group with --llem-gpus=0-1,2-3",
        )


def _unused_gpus_note(
    case: CaseConfig, device: str, records: list[MeterRecord], assignment: dict[str, str]
) -> str | None:
    """A note when the GPU meter measures more GPUs than the case's engine uses: the idle power
    of the others is in its energy (pin with CUDA_VISIBLE_DEVICES or --llem-gpus)."""
    meter = assignment.get("gpu")
    if meter is None or not device.startswith("cuda"):
        return None
    measured = max((len(r.devices) for r in records if r.name == meter), default=0)
    used = gpus_needed(case)
    if measured <= used:
        return None
    return (
        f"{meter} measures all {measured} visible GPUs but the case uses {used}: the others' "
        "power is in gpu_energy_j (dynamic energy subtracts their idle power); set "
        "CUDA_VISIBLE_DEVICES or --llem-gpus to measure only the GPUs in use"
    )


def _flag_shared(metrics: dict[str, MetricSummary], shared: list[str]) -> list[str]:
    """Note the domains every xdist worker shares, on the case and on their energy figures."""
    if not shared:
        return []
    for domain in shared:
        summary = metrics.get(f"{domain}_energy_j")
        if summary is not None:
            metrics[f"{domain}_energy_j"] = summary.model_copy(
                update={"note": _shared_note([domain])}
            )
    return [_shared_note(shared)]


def _shared_note(domains: list[str]) -> str:
    return (
        f"{', '.join(domains)}: shared by every xdist worker on this machine, so the figure "
        "includes the other workers' load; not attributable to this case"
    )


def _isolation_notes(isolation: IsolationRecord) -> list[str]:
    """What stands against the GPU being this case's alone: foreign processes, unchecked GPUs."""
    notes = [_foreign_note(isolation)] if isolation.foreign else []
    unchecked = unchecked_note(isolation)
    return [*notes, unchecked] if unchecked else notes


def _foreign_note(isolation: IsolationRecord) -> str:
    seen = ", ".join(
        f"pid {p.pid} on {p.device}"
        + (f" ({p.memory_mb:.0f} MiB)" if p.memory_mb is not None else "")
        for p in isolation.foreign
    )
    return f"other processes run on the measured GPU: {seen} (--llem-isolation={isolation.mode})"


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
    if isinstance(error, (MeterUnavailableError, BackendNotAvailableError, NotEnoughGpusError)):
        return True
    return isinstance(error, BackendConfigError) and error.param == "device"


def _error(error: BaseException) -> CaseError:
    return CaseError(type=type(error).__name__, message=str(error))


@pytest.fixture
def llem_sweep_params(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The values of this test's sweep combination, by parameter path (empty without a sweep).

    ``@pytest.mark.llem_sweep``, ``--llem-sweep`` and the ``llem_sweep`` ini key parametrize
    it; the ``llem`` fixture applies them.
    """
    case = getattr(request, "param", None)
    return dict(case.values) if isinstance(case, SweepCase) else {}


@pytest.fixture
def llem(request: pytest.FixtureRequest, llem_sweep_params: dict[str, Any]) -> LlemFixture:
    """Run an LLM inference energy benchmark: ``result = llem.run()``.

    Parameters come from ``@pytest.mark.llem(...)``, ``@pytest.mark.llem_sweep(...)``,
    ``llem.run(**overrides)``, the ini keys and the ``--llem-*`` options.
    ``result["energy_per_output_token_j"].median`` and friends give each metric's summary over
    the measured repetitions.
    """
    del llem_sweep_params  # requested so a sweep parametrizes it; the item keeps the case
    session = request.config.stash[SESSION_KEY]
    item = request.node
    assert isinstance(item, pytest.Item)
    return LlemFixture(item, session, sweep_case_of(item), request)
