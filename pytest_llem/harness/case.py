"""Run one benchmark case from start to record, without pytest.

:class:`CaseRunner` does everything between a resolved :class:`~pytest_llem.config.CaseConfig`
and its run-record entry: it takes the session's meters and idle baseline, checks that the
machine has the GPUs the case needs and that no other process runs on them, loads (or reuses)
the backend, prepares the prompts, cools down, sizes the measurement window, runs the case under
``--llem-timeout-s``, summarises it, and checks its budget. What became of the case comes back
as a :class:`CaseOutcome`: the record, the result, and a skip or failure reason. The ``llem``
fixture maps that to pytest (skip, fail, user properties); a search over configurations can use
it as it is. Nothing here imports pytest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pytest_llem.backends.base import Backend, BackendInfo
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
from pytest_llem.harness.adaptive import AdaptiveStop
from pytest_llem.harness.deadline import deadline
from pytest_llem.harness.machine_state import (
    MachineProbe,
    gpu_process_counter,
    summarise_machine_state,
)
from pytest_llem.harness.resources import (
    check_case_isolation,
    check_gpu_count,
    flag_shared,
    isolation_notes,
    multi_node_note,
    unused_gpus_note,
)
from pytest_llem.harness.runner import CaseMeasurement, WindowPolicy, run_case
from pytest_llem.harness.thermal import HOT_MARGIN_C, cool_down, measured_hot
from pytest_llem.harness.traffic import request_count
from pytest_llem.meters.base import EnergyMeter
from pytest_llem.meters.registry import DomainAssignment
from pytest_llem.results.adaptive import AUTO, AdaptivePlan
from pytest_llem.results.drift import DEFAULT_DRIFT_MARGIN, DriftMargin
from pytest_llem.results.models import (
    BaselineRecord,
    CaseError,
    CaseRecord,
    CaseResult,
    IsolationRecord,
    LoadRecord,
    MeterRecord,
    PromptsRecord,
    RunRecord,
)
from pytest_llem.results.stats import distribution

if TYPE_CHECKING:
    from pytest_llem.results.gate import BudgetRule, GateRule

__all__ = [
    "BUDGET_EXCEEDED",
    "RESOLVED_AT_LOAD",
    "BackendProvider",
    "BaselineProvider",
    "CaseOutcome",
    "CaseRunner",
    "CaseSettings",
    "MeterProvider",
    "case_error",
    "is_skip_error",
    "start_record",
]

logger = logging.getLogger("pytest_llem")

#: ``error.type`` of a case whose budget (``@pytest.mark.llem_budget``) limits were breached.
BUDGET_EXCEEDED = "BudgetExceeded"
#: Parameters a backend resolves when it loads (``auto``): the record keeps what it chose.
RESOLVED_AT_LOAD = ("device", "dtype")


class BackendProvider(Protocol):
    """Protocol: where a case gets its loaded backend (the session's backend cache)."""

    def get(self, case: CaseConfig) -> tuple[Backend, BackendInfo, LoadRecord]:
        """The backend for ``case``, loaded or reused, with its facts and load record."""
        ...

    def close(self) -> None:
        """Release the resident backend, if any."""
        ...


class MeterProvider(Protocol):
    """Protocol: the session's meters, and which meter each domain is taken from."""

    @property
    def assignment(self) -> DomainAssignment:
        """Which meter supplies each domain (valid once ``get`` has been called)."""
        ...

    def get(self) -> tuple[list[EnergyMeter], list[MeterRecord]]:
        """The meters and their records (created on first use)."""
        ...


class BaselineProvider(Protocol):
    """Protocol: the session's idle baseline, measured once before the first case."""

    @property
    def problem(self) -> str | None:
        """Why there is no baseline, or None."""
        ...

    def get(
        self,
        meters: Sequence[EnergyMeter],
        records: Sequence[MeterRecord],
        assignment: DomainAssignment,
    ) -> BaselineRecord | None:
        """The baseline, measuring it on first use."""
        ...


@dataclass(frozen=True)
class CaseSettings:
    """The session-wide settings a case runs under (from the ``--llem-*`` options).

    Attributes:
        isolation: ``--llem-isolation``: ``warn``, ``skip`` or ``fail`` when another process
            runs on a measured GPU.
        min_window_s: ``--llem-min-window-s``: the shortest measurement window.
        cooldown: ``--llem-cooldown`` mode: ``off``, ``seconds`` or ``temperature``.
        cooldown_s: Seconds to wait in the ``seconds`` mode.
        timeout_s: ``--llem-timeout-s``: the most a case's own work may take (None: no limit).
        gate_estimated: Whether estimated energy figures are checked against a budget (and
            gate a comparison).
        probe_machine: Record the host's state at each window's edges (``/proc``).
        drift_margin: ``--llem-drift-margin``: when the machine changed between windows.
        adaptive: The limits of ``repeat="auto"`` (``--llem-max-repeat``, ...).
        gate_baseline: The ``--llem-compare`` baseline when ``--llem-fail-on`` gates the run:
            an adaptive case then measures until its gated verdicts are decided.
        gate_rules: The ``--llem-fail-on`` rules.
    """

    isolation: str = "warn"
    min_window_s: float = 0.0
    cooldown: str = "off"
    cooldown_s: float = 0.0
    timeout_s: float | None = None
    gate_estimated: bool = False
    probe_machine: bool = True
    drift_margin: DriftMargin = DEFAULT_DRIFT_MARGIN
    adaptive: AdaptivePlan = field(default_factory=AdaptivePlan)
    gate_baseline: RunRecord | None = None
    gate_rules: tuple[GateRule, ...] = ()


@dataclass(frozen=True)
class CaseOutcome:
    """What became of one case.

    Attributes:
        record: The case's run-record entry (its ``outcome`` is passed, failed or skipped).
        result: The measured result; None when the case was not measured.
        skip_reason: Why the case was skipped (missing hardware or engine, not isolated).
        failure: A one-line reason the case failed, or None.
        exception: An unexpected error (not a :class:`~pytest_llem.exceptions.LlemError`) that
            failed the case; a caller re-raises it to keep its traceback.
    """

    record: CaseRecord
    result: CaseResult | None = None
    skip_reason: str | None = None
    failure: str | None = None
    exception: Exception | None = None


@dataclass(frozen=True)
class _Prepared:
    """Everything a case needs before its first window."""

    meters: list[EnergyMeter]
    records: list[MeterRecord]
    assignment: dict[str, str]
    baseline: BaselineRecord | None
    isolation: IsolationRecord | None
    backend: Backend
    info: BackendInfo
    load: LoadRecord
    prompts: PromptSet


def _no_progress(message: str) -> None:
    del message


class CaseRunner:
    """Runs cases on the session's backend cache, meters and idle baseline.

    Args:
        backends: The backend cache (closed after a failure, so no half-used model stays).
        meters: The session's meters.
        baseline: The session's idle baseline, or None for none.
        settings: The session-wide settings a case runs under.
        progress: Where a message for the user goes (a retry after running out of memory).
    """

    def __init__(
        self,
        *,
        backends: BackendProvider,
        meters: MeterProvider,
        baseline: BaselineProvider | None = None,
        settings: CaseSettings | None = None,
        progress: Callable[[str], None] = _no_progress,
    ) -> None:
        self.backends = backends
        self.meters = meters
        self.baseline = baseline
        self.settings = settings if settings is not None else CaseSettings()
        self._progress = progress

    def run(
        self, case: CaseConfig, base: CaseRecord, *, budget: Sequence[BudgetRule] = ()
    ) -> CaseOutcome:
        """Run ``case`` and say what became of it; never raises for a failed case.

        Args:
            case: The resolved case.
            base: The start of its record (:func:`start_record`): identity, parameters,
                placement and notes so far.
            budget: Limits the result must hold (a breach fails the case).

        Returns:
            The outcome. A missing meter, engine or device, too few GPUs, or a GPU not isolated
            under ``isolation="skip"`` skip the case; other errors fail it.
        """
        try:
            result = self.measure(case, base)
        except GpuNotIsolatedError as e:
            return self._not_isolated(e, base)
        except LlemError as e:
            if is_skip_error(e):
                skipped = {"outcome": "skipped", "notes": [str(e), *base.notes]}
                return CaseOutcome(record=base.model_copy(update=skipped), skip_reason=str(e))
            self.backends.close()  # a failed case leaves no half-used model behind
            return _failed(base, e)
        except Exception as e:
            self.backends.close()
            return _failed(base, e, exception=e)
        return self._passed(result, base, budget)

    def measure(self, case: CaseConfig, base: CaseRecord) -> CaseResult:
        """Measure the case; out of memory frees the model cache and tries again.

        Raises:
            LlemError: The case could not be measured (see :meth:`run` for which skip).
        """
        attempts = 0
        while True:
            try:
                return self._measure_once(case, base)
            except RetryableError as e:
                attempts += 1
                self.backends.close()
                if attempts > e.max_retries:
                    raise
                self._progress(
                    f"{base.name}: {e}; freed the model cache, retrying ({attempts}/"
                    f"{e.max_retries})"
                )

    def _not_isolated(self, error: GpuNotIsolatedError, base: CaseRecord) -> CaseOutcome:
        skip = self.settings.isolation == "skip"
        update: dict[str, Any] = {
            "outcome": "skipped" if skip else "failed",
            "isolation": error.isolation,
            "notes": [str(error), *base.notes],
        }
        if skip:
            return CaseOutcome(record=base.model_copy(update=update), skip_reason=str(error))
        update["error"] = case_error(error)
        return CaseOutcome(record=base.model_copy(update=update), failure=_failure_line(error))

    def _passed(
        self, result: CaseResult, base: CaseRecord, budget: Sequence[BudgetRule]
    ) -> CaseOutcome:
        breaches = _budget_breaches(result, budget, gate_estimated=self.settings.gate_estimated)
        record = CaseRecord(**{**result.model_dump(), "id": base.id, "name": base.name})
        if not breaches:
            return CaseOutcome(record=record, result=result)
        record.outcome = "failed"
        record.error = CaseError(type=BUDGET_EXCEEDED, message="; ".join(breaches))
        failure = "llem budget exceeded:\n  " + "\n  ".join(breaches)
        return CaseOutcome(record=record, result=result, failure=failure)

    def _prepare(self, case: CaseConfig) -> _Prepared:
        """Meters, baseline, resources and isolation, backend and prompts, in that order: the
        session's own work (the baseline, the model load) happens before the case's deadline."""
        meters, records = self.meters.get()
        assignment = self.meters.assignment
        baseline = (
            self.baseline.get(meters, records, assignment) if self.baseline is not None else None
        )
        check_gpu_count(case)
        isolation = check_case_isolation(meters, assignment.meters, mode=self.settings.isolation)
        backend, info, load = self.backends.get(case)
        prompts = build_prompt_set(case, backend, count=_request_count(case))
        return _Prepared(
            meters=meters,
            records=records,
            assignment=assignment.meters,
            baseline=baseline,
            isolation=isolation,
            backend=backend,
            info=info,
            load=load,
            prompts=prompts,
        )

    def _measure_once(self, case: CaseConfig, base: CaseRecord) -> CaseResult:
        ready = self._prepare(case)
        spans_nodes = multi_node_note(case)
        params, asked = _as_ran(base.params, ready.info)
        idle_temperatures = ready.baseline.idle_temperature_c if ready.baseline is not None else {}
        cooldown = cool_down(
            ready.meters,
            mode=self.settings.cooldown,
            seconds=self.settings.cooldown_s,
            idle_temperatures=idle_temperatures,
        )
        measurement, armed = self._run(case, ready, base.id)
        notes = [*base.notes, *asked, *measurement.notes]
        timeout_s = self.settings.timeout_s
        if timeout_s and not armed:
            notes.append(
                f"--llem-timeout-s={timeout_s:g} cannot interrupt a case here "
                "(no SIGALRM on this thread)"
            )
        if ready.baseline is None and self.baseline is not None and self.baseline.problem:
            notes.append(self.baseline.problem)
        shared = [d for d in base.shared_domains if d in ready.assignment]
        notes.extend(flag_shared(measurement.metrics, shared))
        hot = measured_hot(measurement.repetitions, idle_temperatures)
        notes.extend(_resource_notes(case, ready, hot=hot))
        machine = summarise_machine_state(
            measurement.repetitions, measured_hot=hot, margin=self.settings.drift_margin
        )
        if machine is not None and machine.disturbed:
            disturbed = f"machine disturbed during the case: {'; '.join(machine.disturbances)}"
            notes.append(disturbed)
            logger.warning("llem: %s: %s", base.name, disturbed)
        if spans_nodes is not None:
            notes.append(spans_nodes)
        backend_info = {k: v for k, v in vars(ready.info).items() if v is not None and v != {}}
        return CaseResult(
            params=params,
            backend=case.backend,
            model=case.model,
            backend_info=backend_info,
            meters=ready.records,
            metrics=measurement.metrics,
            latency=measurement.latency,
            repetitions=measurement.repetitions,
            load=ready.load,
            prompts=_prompts_record(ready.prompts),
            sweep=base.sweep,
            warmup=case.warmup,
            notes=notes,
            baseline=ready.baseline,
            cooldown=cooldown,
            measured_hot=hot,
            multi_node=spans_nodes is not None,
            isolation=ready.isolation,
            worker=base.worker,
            visible_devices=base.visible_devices,
            shared_domains=shared,
            machine_state=machine,
            adaptive=measurement.adaptive,
        )

    def _adaptive(self, case: CaseConfig, case_id: str) -> AdaptiveStop | None:
        """When an adaptive case stops: against its baseline case under a gate, else by the
        intervals' width (None for a fixed ``repeat``)."""
        if case.repeat != AUTO:
            return None
        settings = self.settings
        gate_baseline = settings.gate_baseline
        baseline = None
        if gate_baseline is not None and settings.gate_rules:
            baseline = next((c for c in gate_baseline.cases if c.id == case_id), None)
        return AdaptiveStop(
            settings.adaptive,
            time.perf_counter,
            baseline=baseline,
            rules=settings.gate_rules,
            gate_estimated=settings.gate_estimated,
        )

    def _run(
        self, case: CaseConfig, ready: _Prepared, case_id: str
    ) -> tuple[CaseMeasurement, bool]:
        """Warmup and measured windows under the deadline; and whether the deadline was armed."""
        policy = WindowPolicy.for_meters(
            min_window_s=self.settings.min_window_s,
            update_periods=[r.update_period_s for r in ready.records if r.used_for],
        )
        probe = (
            MachineProbe(gpu_processes=gpu_process_counter(ready.meters))
            if self.settings.probe_machine
            else None
        )
        # Only the case's own work counts against --llem-timeout-s: the idle baseline, the
        # model load and the cooldown are the session's, and may take any time.
        with deadline(self.settings.timeout_s) as armed:
            measurement = run_case(
                backend=ready.backend,
                meters=ready.meters,
                config=case,
                requests=ready.prompts.requests,
                non_embedding_parameters=ready.info.non_embedding_parameters,
                policy=policy,
                baseline=ready.baseline,
                assignment=ready.assignment,
                baseline_problem=self.baseline.problem if self.baseline is not None else None,
                machine=probe,
                adaptive=self._adaptive(case, case_id),
            )
        return measurement, armed


def _resource_notes(case: CaseConfig, ready: _Prepared, *, hot: bool) -> list[str]:
    """Notes on what the case had of the machine: isolation, GPUs it did not use, heat."""
    notes = isolation_notes(ready.isolation) if ready.isolation is not None else []
    extra_gpus = unused_gpus_note(case, ready.info.device, ready.records, ready.assignment)
    if extra_gpus is not None:
        notes.append(extra_gpus)
        logger.warning("llem: %s", extra_gpus)
    if hot:
        notes.append(
            f"measured hot: a window started more than {HOT_MARGIN_C:g} C above idle "
            "temperature (try --llem-cooldown=temperature)"
        )
    return notes


def start_record(
    case: CaseConfig,
    *,
    case_id: str,
    name: str,
    sweep: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    worker: str | None = None,
    visible_devices: str | None = None,
    shared_domains: Sequence[str] = (),
) -> CaseRecord:
    """The start of a case's record, before it runs: identity, parameters and placement.

    Args:
        case: The resolved case.
        case_id: Its id in the run record (a pytest node id under pytest).
        name: Its short name.
        sweep: The values of its sweep combination, by parameter path.
        notes: Notes so far (overrides that lost to an option, say).
        worker: The xdist worker that runs it, if any.
        visible_devices: ``CUDA_VISIBLE_DEVICES`` as the case saw it.
        shared_domains: Energy domains shared with other workers on this machine.
    """
    return CaseRecord(
        id=case_id,
        name=name,
        params=case.model_dump(mode="json"),
        backend=case.backend,
        model=case.model,
        sweep=dict(sweep or {}),
        notes=list(notes),
        worker=worker,
        visible_devices=visible_devices,
        shared_domains=list(shared_domains),
    )


def is_skip_error(error: LlemError) -> bool:
    """Errors that make a case skip rather than fail: a meter that cannot measure here, an
    engine that is not installed, a device (``device=cuda``) this machine does not have."""
    if isinstance(error, (MeterUnavailableError, BackendNotAvailableError, NotEnoughGpusError)):
        return True
    return isinstance(error, BackendConfigError) and error.param == "device"


def case_error(error: BaseException) -> CaseError:
    """The record's ``error``: the exception's type name and message."""
    return CaseError(type=type(error).__name__, message=str(error))


def _failure_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _failed(
    base: CaseRecord, error: Exception, *, exception: Exception | None = None
) -> CaseOutcome:
    record = base.model_copy(update={"outcome": "failed", "error": case_error(error)})
    return CaseOutcome(record=record, failure=_failure_line(error), exception=exception)


def _budget_breaches(
    result: CaseResult, rules: Sequence[BudgetRule], *, gate_estimated: bool
) -> list[str]:
    if not rules:
        return []
    from pytest_llem.results.gate import check_budget

    return check_budget(result, rules, gate_estimated=gate_estimated)


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
