"""Comparing two runs: matched cases, ratios of medians with bootstrap intervals, verdicts.

The regression test of METRICS.md ("Repetitions and statistics"): for every case present in
both runs and every gated metric, the ratio of medians (current / baseline) over the measured
repetitions and its 95% bootstrap interval decide the verdict. Under a gate nothing passes
silently: a gated metric of a measured baseline case that gets no verdict (too few windows, no
value, the case failed or is gone) is ``not judged`` and fails the gate, and so does a baseline
with no measured case or a current run with no case. The plugin's terminal summary and
``llem compare`` both render a :class:`Comparison` with
:mod:`pytest_llem.results.compare_format` (re-exported here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pytest_llem.config.resolve import flatten_paths
from pytest_llem.results.catalogue import lookup
from pytest_llem.results.compare_format import (
    format_breaches,
    format_table,
    to_json,
    to_markdown,
)
from pytest_llem.results.comparison import (
    MIN_WINDOWS,
    CaseMatch,
    Comparison,
    Interval,
    MetricComparison,
    RunIdentity,
    UnmatchedCase,
    Verdict,
    classify,
    clean_values,
    difference_interval,
    ratio_interval,
)
from pytest_llem.results.drift import DEFAULT_DRIFT_MARGIN, CaseDrift, DriftMargin, assess_drift
from pytest_llem.results.gate import GateRule
from pytest_llem.results.history import history_intervals, older_cases, pooled_values
from pytest_llem.results.models import CaseRecord, MachineInfo, RunManifest, RunRecord

__all__ = [
    "ENVIRONMENT_LIBRARIES",
    "IGNORED_PARAMS",
    "Comparison",
    "apply_drift",
    "case_values",
    "classify",
    "compare_runs",
    "difference_interval",
    "environment_differences",
    "format_breaches",
    "format_table",
    "manifest_differences",
    "match_cases",
    "parameter_changes",
    "ratio_interval",
    "to_json",
    "to_markdown",
]

#: Case parameters that never change a result, so cases still match when they differ.
IGNORED_PARAMS: frozenset[str] = frozenset({"repeat", "warmup"})
#: Libraries whose versions are compared between runs (with the GPUs and the driver).
ENVIRONMENT_LIBRARIES: tuple[str, ...] = ("torch", "transformers", "vllm", "tensorrt-llm")


# --- matching --------------------------------------------------------------------------------


def _relevant(case: CaseRecord) -> dict[str, Any]:
    params = dict(case.params)
    for name in ("device", "dtype"):
        # Records before params held what ran say "auto": compare what it resolved to.
        ran = case.backend_info.get(name)
        if params.get(name) == "auto" and isinstance(ran, str):
            params[name] = ran
    return {k: v for k, v in flatten_paths(params).items() if k not in IGNORED_PARAMS}


def _param_changes(base: dict[str, Any], cur: dict[str, Any]) -> str:
    keys = sorted(set(base) | set(cur))
    missing = "(unset)"
    changed = [
        f"{k} {base.get(k, missing)!r} -> {cur.get(k, missing)!r}"
        for k in keys
        if base.get(k, missing) != cur.get(k, missing)
    ]
    return "parameters changed: " + ", ".join(changed)


def match_cases(baseline: RunRecord, current: RunRecord) -> CaseMatch:
    """Match the cases of two runs by case id.

    A case whose resolved parameters changed (``--llem-set batch_size=1`` against a baseline
    run with 8, say) is still compared: that is what a regression check of a configuration
    change is for. :func:`parameter_changes` names the changes (parameters in
    :data:`IGNORED_PARAMS` do not count).

    Returns:
        Pairs in the current run's order, then new cases (current only) and gone cases
        (baseline only).
    """
    base_by_id = {case.id: case for case in baseline.cases}
    cur_ids = {case.id for case in current.cases}
    pairs: list[tuple[CaseRecord, CaseRecord]] = []
    new: list[UnmatchedCase] = []
    for case in current.cases:
        base = base_by_id.get(case.id)
        if base is None:
            new.append(UnmatchedCase(case))
        else:
            pairs.append((base, case))
    gone = [UnmatchedCase(case) for case in baseline.cases if case.id not in cur_ids]
    return CaseMatch(pairs, new, gone)


def parameter_changes(pairs: list[tuple[CaseRecord, CaseRecord]]) -> list[UnmatchedCase]:
    """The matched cases whose resolved parameters differ, each with a note naming them."""
    changed = []
    for base, case in pairs:
        base_params, cur_params = _relevant(base), _relevant(case)
        if base_params != cur_params:
            changed.append(UnmatchedCase(case, _param_changes(base_params, cur_params)))
    return changed


# --- comparing -------------------------------------------------------------------------------


def case_values(case: CaseRecord, metric: str) -> tuple[list[float], float | None]:
    """Per-window values of a metric, and its median (from the summary when there are no
    repetitions; then there are no values to resample)."""
    summary = case.metrics.get(metric)
    summary_median = summary.median if summary is not None else None
    if case.repetitions:
        import numpy as np

        values = clean_values(rep.values.get(metric) for rep in case.repetitions)
        median = float(np.median(np.asarray(values))) if values else summary_median
        return values, median
    return ([summary_median] if summary_median is not None else []), summary_median


def _source(case: CaseRecord, metric: str) -> str:
    summary = case.metrics.get(metric)
    if summary is not None:
        return summary.source
    known = lookup(metric)
    if known is not None and known.follows_meters:
        sources = {s for rep in case.repetitions for s in rep.energy_sources.values()}
        if sources - {"measured"}:
            return "estimated"
    return "measured"


def _unit(base: CaseRecord, cur: CaseRecord | None, metric: str) -> str:
    for case in (cur, base):
        summary = case.metrics.get(metric) if case is not None else None
        if summary is not None and summary.unit:
            return summary.unit
    known = lookup(metric)
    return known.unit if known is not None else ""


def _outcome(case: CaseRecord) -> str | None:
    """``failed: RuntimeError: boom`` or ``skipped: needs a GPU`` for a case that did not pass;
    None for one that did."""
    if case.outcome == "passed":
        return None
    if case.error is not None:
        return f"{case.outcome}: {case.error.type}: {case.error.message}"
    return f"{case.outcome}: {case.notes[0]}" if case.notes else case.outcome


def _measured(case: CaseRecord) -> bool:
    """Whether the case has a measured window (a case failed by its budget still has)."""
    return bool(case.repetitions) or any(s.median is not None for s in case.metrics.values())


def _windows(n: int) -> str:
    return "no value" if n == 0 else f"{n} window{'' if n == 1 else 's'}"


def _why_missing(case: CaseRecord, metric: str, n: int) -> str | None:
    """Why a side has too few windows: the case's outcome when it did not pass, else, when no
    window has a value, the summary's recorded reason (taken from the windows' ``missing``)."""
    outcome = _outcome(case)
    if outcome is not None:
        return f"case {outcome}"
    summary = case.metrics.get(metric)
    return summary.note if n == 0 and summary is not None and summary.n == 0 else None


def _missing_reason(base: CaseRecord, cur: CaseRecord, metric: str, nb: int, nc: int) -> str:
    sides = []
    for label, case, n in (("baseline", base, nb), ("current", cur, nc)):
        if n < MIN_WINDOWS:
            why = _why_missing(case, metric, n)
            sides.append(f"{label} has {_windows(n)}{f' ({why})' if why else ''}")
    return "; ".join(sides) + f": at least {MIN_WINDOWS} windows per side are needed"


def _no_verdict(*, gate: bool, source: str, gate_estimated: bool) -> tuple[Verdict, bool]:
    """The verdict of a metric that could not be judged, and whether it is gated."""
    if gate and (source != "estimated" or gate_estimated):
        return "not judged", True
    return "not comparable", False


def _compare_metric(
    base: CaseRecord,
    cur: CaseRecord,
    rule: GateRule,
    *,
    gate: bool,
    gate_estimated: bool,
    older: Sequence[CaseRecord] = (),
) -> MetricComparison:
    metric = rule.metric
    base_values, base_median = case_values(base, metric)
    cur_values, cur_median = case_values(cur, metric)
    sources = {_source(base, metric), _source(cur, metric)}
    source = "estimated" if "estimated" in sources else _source(cur, metric)
    # an adaptive case looked several times: its verdict takes the level its looks used
    confidence = cur.adaptive.confidence if cur.adaptive is not None else 0.95
    if older:  # a history: the older runs' windows with the newest's, resampled by run
        groups = [case_values(case, metric)[0] for case in (*older, base)]
        base_values, base_median = pooled_values(groups)
        ratio, difference = history_intervals(groups, cur_values, confidence)
    else:
        ratio = ratio_interval(base_values, cur_values, confidence)
        difference = difference_interval(base_values, cur_values, confidence)
    used = ratio if rule.relative else difference
    reason: str | None = None
    verdict: Verdict
    if used is None:
        verdict, gated = _no_verdict(gate=gate, source=source, gate_estimated=gate_estimated)
        if len(base_values) < MIN_WINDOWS or len(cur_values) < MIN_WINDOWS:
            reason = _missing_reason(base, cur, metric, len(base_values), len(cur_values))
        else:
            reason = "no ratio: a median is not positive (use an absolute threshold)"
    else:
        verdict = classify(rule, used[1], used[2])
        gated = gate and (source != "estimated" or gate_estimated)
        if source == "estimated" and not gate_estimated:
            reason = "estimated energy is not gated (--llem-gate-estimated gates it)"
    return MetricComparison(
        case_id=cur.id,
        metric=metric,
        rule=rule,
        unit=_unit(base, cur, metric),
        source=source,
        baseline_median=base_median,
        current_median=cur_median,
        baseline_n=len(base_values),
        current_n=len(cur_values),
        ratio=Interval(*ratio) if ratio else None,
        difference=Interval(*difference) if difference else None,
        verdict=verdict,
        gated=gated,
        reason=reason,
        confidence=confidence,
    )


def _gone_metric(base: CaseRecord, rule: GateRule, *, gate_estimated: bool) -> MetricComparison:
    """A gated metric of a baseline case the current run does not have: not judged."""
    base_values, base_median = case_values(base, rule.metric)
    source = _source(base, rule.metric)
    verdict, gated = _no_verdict(gate=True, source=source, gate_estimated=gate_estimated)
    return MetricComparison(
        case_id=base.id,
        metric=rule.metric,
        rule=rule,
        unit=_unit(base, None, rule.metric),
        source=source,
        baseline_median=base_median,
        current_median=None,
        baseline_n=len(base_values),
        current_n=0,
        ratio=None,
        difference=None,
        verdict=verdict,
        gated=gated,
        reason="not in the current run",
    )


def _run_problems(baseline: RunRecord, current: RunRecord) -> list[str]:
    """Why nothing at all can be judged: no measured baseline case, or no current case; or
    why some cannot: a partial merged record of shards on either side."""
    problems = []
    if not any(_measured(case) for case in baseline.cases):
        counts: dict[str, int] = {}
        for case in baseline.cases:
            counts[case.outcome] = counts.get(case.outcome, 0) + 1
        how = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
        what = f"no measured case ({how})" if how else "no case"
        problems.append(f"the baseline has {what}: nothing to compare against")
    if not current.cases:
        problems.append("the current run has no case: nothing to judge")
    for which, record in (("baseline", baseline), ("current run", current)):
        if record.partial is not None:
            from pytest_llem.results.shards import partial_note

            problems.append(f"the {which} is a {partial_note(record.partial)}")
    return problems


def compare_runs(
    baseline: RunRecord,
    current: RunRecord,
    rules: Sequence[GateRule],
    *,
    gate_estimated: bool = False,
    gate: bool = True,
    baseline_label: str | None = None,
    current_label: str | None = None,
    drift_margin: DriftMargin = DEFAULT_DRIFT_MARGIN,
    history: Sequence[RunRecord] = (),
) -> Comparison:
    """Compare every case of the baseline with the current run under ``rules``.

    A baseline case skipped there (nothing was measured on purpose) is only listed in
    :attr:`Comparison.unmeasured`. Under a gate every other baseline case gets a row per rule,
    and a gated metric without a verdict (too few windows on a side, no value, a failed or
    skipped current case, a case gone from the current run) is ``not judged``, which fails the
    gate. Cases new in the current run are listed and never fail.

    Args:
        baseline: The saved run compared against.
        current: This run.
        rules: From :func:`~pytest_llem.results.gate.parse_fail_on`.
        gate_estimated: Let estimated energy figures gate (their verdicts are always shown).
        gate: False to report verdicts without gating anything (a comparison asked for
            without ``--llem-fail-on``; pass the example rules to show the usual metrics).
        baseline_label: How to name the baseline in reports (e.g. its file).
        current_label: How to name the current run.
        drift_margin: When a case's machine state differs between the runs, or changed within
            one, so much that a breach is ``inconclusive`` (:mod:`~pytest_llem.results.drift`).
        history: Older saved runs that make one history with ``baseline`` (the newest): a
            case's baseline values are then all these runs' windows, and its intervals come
            from :func:`~pytest_llem.results.history.history_intervals`.

    Returns:
        The comparison of every pair and rule, new, gone and unmeasured cases, run-level
        problems, environment differences and each case's drift.
    """
    matched = match_cases(baseline, current)
    unmeasured = [
        UnmatchedCase(case, _outcome(case)) for case in baseline.cases if not _measured(case)
    ]
    skipped = {u.case.id for u in unmeasured if u.case.outcome == "skipped"}
    older = older_cases(baseline, history)
    metrics = [
        _compare_metric(
            base, cur, rule, gate=gate, gate_estimated=gate_estimated, older=older[base.id]
        )
        for base, cur in matched.pairs
        if base.id not in skipped
        for rule in rules
    ]
    drift = [
        assess_drift(cur.id, base.machine_state, cur.machine_state, drift_margin)
        for base, cur in matched.pairs
        if base.id not in skipped
    ]
    metrics = apply_drift(metrics, drift)
    if gate:
        metrics.extend(
            _gone_metric(gone.case, rule, gate_estimated=gate_estimated)
            for gone in matched.gone
            if gone.case.id not in skipped
            for rule in rules
        )
    return Comparison(
        baseline=RunIdentity.of(baseline, baseline_label),
        current=RunIdentity.of(current, current_label),
        rules=tuple(rules),
        metrics=tuple(metrics),
        new=tuple(matched.new),
        gone=tuple(matched.gone),
        changed=tuple(parameter_changes(matched.pairs)),
        environment=tuple(environment_differences(baseline, current)),
        gate=gate,
        gate_estimated=gate_estimated,
        unmeasured=tuple(unmeasured),
        problems=tuple(_run_problems(baseline, current)),
        drift=tuple(drift),
    )


def apply_drift(
    metrics: Sequence[MetricComparison], drift: Sequence[CaseDrift]
) -> list[MetricComparison]:
    """Drift is not a regression: on a disturbed case a ``regressed`` verdict becomes
    ``inconclusive`` with the evidence as its reason (``machine disturbed (...)``); every
    verdict of the case is flagged ``disturbed``. Other cases are left as they are."""
    disturbed = {d.case_id: d for d in drift if d.disturbed}
    judged: list[MetricComparison] = []
    for m in metrics:
        case = disturbed.get(m.case_id)
        if case is None:
            judged.append(m)
        elif m.verdict == "regressed":
            reason = (
                f"{case.reason}: beyond {m.rule.limit_text} on a changed machine, "
                "not attributed to the code"
            )
            judged.append(
                dataclasses.replace(m, verdict="inconclusive", reason=reason, disturbed=True)
            )
        else:
            judged.append(dataclasses.replace(m, disturbed=True))
    return judged


# --- environment -----------------------------------------------------------------------------


def _gpus(machine: MachineInfo) -> str:
    counts: dict[str, int] = {}
    for gpu in machine.gpus:
        counts[gpu.name] = counts.get(gpu.name, 0) + 1
    return ", ".join(f"{n}x {name}" for name, n in sorted(counts.items())) or "no GPU"


def _drivers(machine: MachineInfo) -> str | None:
    drivers = sorted({gpu.driver for gpu in machine.gpus if gpu.driver})
    return ", ".join(drivers) if drivers else None


def environment_differences(baseline: RunRecord, current: RunRecord) -> list[str]:
    """What differs between the machines of two runs and may move the figures by itself.

    Compares the GPU models and counts, the NVIDIA driver (when both runs know it), the
    versions of :data:`ENVIRONMENT_LIBRARIES` (when both runs recorded them, in the machine
    section or the manifest's package list) and, when both records carry a reproducibility
    manifest, the GPU settings that change energy (:func:`manifest_differences`).

    Returns:
        One sentence per difference; empty when the environments match.
    """
    base, cur = baseline.machine, current.machine
    found: list[str] = []
    if _gpus(base) != _gpus(cur):
        found.append(f"GPUs differ: baseline {_gpus(base)}, current {_gpus(cur)}")
    base_driver, cur_driver = _drivers(base), _drivers(cur)
    if base_driver and cur_driver and base_driver != cur_driver:
        found.append(f"GPU driver differs: baseline {base_driver}, current {cur_driver}")
    if not (base_driver and cur_driver):  # the manifest knows it where the GPU list did not
        found.extend(_manifest_driver(baseline.manifest, current.manifest))
    base_libraries, cur_libraries = _libraries(baseline), _libraries(current)
    for lib in ENVIRONMENT_LIBRARIES:
        if lib not in base_libraries or lib not in cur_libraries:
            continue
        old, new = base_libraries[lib], cur_libraries[lib]
        if old != new:
            found.append(
                f"{lib} differs: baseline {old or 'not installed'}, "
                f"current {new or 'not installed'}"
            )
    if baseline.manifest is not None and current.manifest is not None:
        found.extend(manifest_differences(baseline.manifest, current.manifest))
    base_domains, cur_domains = _energy_domains(baseline), _energy_domains(current)
    if base_domains and cur_domains and base_domains != cur_domains:
        found.append(
            f"energy domains differ: baseline {'+'.join(base_domains)}, current "
            f"{'+'.join(cur_domains)} (energy_j sums different domains; compare gpu_energy_j)"
        )
    return found


def _energy_domains(record: RunRecord) -> list[str]:
    """The domains the run's meters supplied (the union over its cases), canonical order."""
    used = {domain for case in record.cases for meter in case.meters for domain in meter.used_for}
    return [domain for domain in ("gpu", "cpu", "dram") if domain in used]


def _libraries(record: RunRecord) -> dict[str, str | None]:
    """Library versions: the machine section's, else the manifest's package list (which
    knows every installed distribution, so one absent there is not installed)."""
    versions = dict(record.machine.libraries)
    manifest = record.manifest
    if manifest is not None:
        for lib in ENVIRONMENT_LIBRARIES:
            versions.setdefault(lib, manifest.python.packages.get(lib))
    return versions


def _manifest_driver(base: RunManifest | None, cur: RunManifest | None) -> list[str]:
    old = base.driver_version if base is not None else None
    new = cur.driver_version if cur is not None else None
    if old and new and old != new:
        return [f"GPU driver differs: baseline {old}, current {new}"]
    return []


#: GPU settings of the manifest that change energy or speed by themselves: field and words.
_GPU_SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("power_limit_w", "GPU power limit", " W"),
    ("application_sm_clock_mhz", "GPU application SM clock", " MHz"),
    ("application_memory_clock_mhz", "GPU application memory clock", " MHz"),
    ("ecc_enabled", "GPU ECC mode", ""),
    ("mig_enabled", "GPU MIG mode", ""),
)


def _setting_text(value: object, unit: str) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}{unit}"
    return f"{value}{unit}"


def manifest_differences(base: RunManifest, cur: RunManifest) -> list[str]:
    """The differences between two manifests that change energy: each GPU's power limit,
    application clocks, ECC and MIG mode (GPUs matched by index; a setting either run could not
    read is not compared) and the CUDA version the driver supports.

    Returns:
        One sentence per difference; empty when they match.
    """
    found: list[str] = []
    if (
        base.cuda_driver_version
        and cur.cuda_driver_version
        and base.cuda_driver_version != cur.cuda_driver_version
    ):
        found.append(
            f"CUDA driver version differs: baseline {base.cuda_driver_version}, "
            f"current {cur.cuda_driver_version}"
        )
    cur_gpus = {gpu.index: gpu for gpu in cur.gpus}
    for old in base.gpus:
        new = cur_gpus.get(old.index)
        if new is None:
            continue
        for name, words, unit in _GPU_SETTINGS:
            was, now = getattr(old, name), getattr(new, name)
            if was is not None and now is not None and was != now:
                found.append(
                    f"{words} differs on GPU {old.index}: baseline {_setting_text(was, unit)}, "
                    f"current {_setting_text(now, unit)}"
                )
    return found
