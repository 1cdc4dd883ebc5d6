"""Scaling out and failing safely: pytest-xdist workers with one merged record, GPU pinning per
worker (fake NVML), shared domains, the isolation check and the per-case timeout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.exceptions import ConfigurationError
from pytest_llem.workers import (
    WorkerInfo,
    load_group_name,
    parse_gpu_groups,
    pin_worker,
    pinned_devices,
    worker_info,
)

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
QUICK = ["-p", "no:cacheprovider", "--llem-warmup=0", "--llem-repeat=1"]

SWEEP = """
import pytest

@pytest.mark.llem(batch_size=2, max_new_tokens=4, min_new_tokens=4, num_prompts=2)
@pytest.mark.llem_sweep(batch_size=[1, 2], **{"transformers.attn_implementation": ["eager", "sdpa"]})
def test_sweep(llem):
    llem.run()
"""


def _record(pytester: pytest.Pytester) -> dict[str, Any]:
    return json.loads((pytester.path / "reports" / "llem-report.json").read_text())


def test_gpu_groups_parse() -> None:
    assert parse_gpu_groups("0,1,2,3") == ((0,), (1,), (2,), (3,))
    assert parse_gpu_groups("0-1, 2-3") == ((0, 1), (2, 3))
    assert parse_gpu_groups(None) is None
    for bad, message in (("0,x", "not a GPU index"), ("3-1", "increasing"), ("0-1,1", "two")):
        with pytest.raises(ConfigurationError, match=message):
            parse_gpu_groups(bad)


def test_pinning_follows_the_parents_visible_devices() -> None:
    assert pinned_devices((1,), None) == "1"
    assert pinned_devices((0, 1), "GPU-a,GPU-b,GPU-c") == "GPU-a,GPU-b"
    with pytest.raises(ConfigurationError, match="GPU 3 requested"):
        pinned_devices((3,), "4,5")
    env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert pin_worker(((0,), (1,)), WorkerInfo("gw1", 1, 2), env) == "5"
    assert env["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(ConfigurationError, match="2 GPU group"):
        pin_worker(((0,), (1,)), WorkerInfo("gw2", 2, 3), {})


def test_worker_info_and_group_names() -> None:
    assert worker_info(None) == WorkerInfo()
    assert worker_info({"workerid": "gw3", "workercount": 4}) == WorkerInfo("gw3", 3, 4)
    assert load_group_name(("a", 1)) == load_group_name(("a", 1))
    assert load_group_name(("a", 1)) != load_group_name(("a", 2))


@pytest.fixture
def workers_import_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """xdist workers are new processes: let them import ``tests.fakes`` from the repo."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{path}" if path else str(REPO))


@pytest.mark.slow
@pytest.mark.usefixtures("workers_import_the_repo")
def test_two_workers_write_one_record_with_the_serial_cases(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makepyfile(SWEEP)
    serial = pytester.runpytest(*QUICK, "--llem-meter=none")
    serial.assert_outcomes(passed=4)
    serial_ids = sorted(case["id"] for case in _record(pytester)["cases"])
    parallel = pytester.runpytest(*QUICK, "--llem-meter=none", "-n", "2")
    parallel.assert_outcomes(passed=4)
    record = _record(pytester)
    assert sorted(case["id"] for case in record["cases"]) == serial_ids
    assert all("@" not in case["id"] for case in record["cases"])
    workers: dict[str, set[str]] = {}
    for case in record["cases"]:
        attn = case["params"]["transformers"]["attn_implementation"]
        workers.setdefault(attn, set()).add(case["worker"])
    # each model-load group (attention implementation) stays on one worker
    assert all(len(ws) == 1 for ws in workers.values())
    assert {w for ws in workers.values() for w in ws} <= {"gw0", "gw1"}
    assert len(list((pytester.path / "reports").glob("llem-report.json"))) == 1


NVML_CONFTEST = """
import sys
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml

GPUS = [FakeGpu(uuid=f"GPU-{i}", power_w=100.0 * (i + 1), counter_step_s=0.01) for i in range(4)]
sys.modules["pynvml"] = FakeNvml(GPUS).module()
"""

PIN_CASE = """
import pytest

@pytest.mark.llem(batch_size=2, max_new_tokens=2, num_prompts=2)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_pin(llem, n):
    llem.run()
"""


@pytest.mark.slow
@pytest.mark.usefixtures("workers_import_the_repo")
@pytest.mark.parametrize(
    ("gpus", "expected"),
    [("0,1", {"gw0": "0", "gw1": "1"}), ("0-1,2-3", {"gw0": "0,1", "gw1": "2,3"})],
)
def test_each_worker_sees_and_measures_only_its_gpus(
    pytester: pytest.Pytester,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    gpus: str,
    expected: dict[str, str],
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pytester.makeconftest(NVML_CONFTEST)
    pytester.makepyfile(PIN_CASE)
    result = pytester.runpytest(
        *QUICK,
        "-n",
        "2",
        "--dist=load",
        f"--llem-gpus={gpus}",
        "--llem-meter=nvml",
        "--llem-baseline-s=0",
        "--llem-min-window-s=0.1",
    )
    result.assert_outcomes(passed=4)
    cases = _record(pytester)["cases"]
    assert {case["worker"] for case in cases} == set(expected)
    for case in cases:
        visible = expected[case["worker"]]
        assert case["visible_devices"] == visible
        (meter,) = case["meters"]
        uuids = [d.split("(")[1].split(", ")[1].rstrip(")") for d in meter["devices"]]
        assert uuids == [f"GPU-{i}" for i in visible.split(",")]
        rep = case["repetitions"][0]
        watts = sum(100.0 * (int(i) + 1) for i in visible.split(","))
        assert rep["gpu_energy_j"] / rep["duration_s"] == pytest.approx(watts, rel=0.25)


def test_more_workers_than_gpu_groups_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    pytester.makepyfile(PIN_CASE)
    result = pytester.runpytest("-n", "3", "--llem-gpus=0,1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llem-gpus gives 2 GPU group(s) for 3 xdist workers*"])


@pytest.mark.slow
def test_one_process_with_a_gpu_group_sums_its_gpus(
    pytester: pytest.Pytester, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor-parallel case: the process sees two GPUs and its energy sums both."""
    from tests.fakes.fake_pynvml import FakeGpu, install

    gpus = [
        FakeGpu(uuid=f"GPU-{i}", power_w=100.0 * (i + 1), counter_step_s=0.01) for i in range(4)
    ]
    install(monkeypatch, gpus)
    pytester.makepyfile(PIN_CASE.replace("[1, 2, 3, 4]", "[1]"))
    result = pytester.runpytest(
        *QUICK, "--llem-gpus=2-3", "--llem-meter=nvml", "--llem-baseline-s=0"
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the inner run pinned this process
    result.assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    assert case["visible_devices"] == "2,3"
    rep = case["repetitions"][0]
    assert rep["gpu_energy_j"] / rep["duration_s"] == pytest.approx(700.0, rel=0.1)  # 300 + 400


@pytest.mark.slow
@pytest.mark.usefixtures("workers_import_the_repo")
def test_cpu_domains_are_flagged_shared_under_xdist(
    pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist", reason="pytest-xdist is not installed")
    from tests.fakes.fake_rapl import FakeRaplTree, intel_zones

    root = tmp_path / "powercap"
    monkeypatch.setenv("LLEM_RAPL_ROOT", str(root))
    pytester.makepyfile(PIN_CASE.replace("[1, 2, 3, 4]", "[1, 2]"))
    with FakeRaplTree(root, intel_zones()):
        result = pytester.runpytest(
            *QUICK, "-n", "2", "--dist=load", "--llem-meter=rapl", "--llem-baseline-s=0"
        )
    result.assert_outcomes(passed=2)
    for case in _record(pytester)["cases"]:
        assert case["shared_domains"] == ["cpu", "dram"]
        assert "not attributable" in case["metrics"]["cpu_energy_j"]["note"]
        assert any("shared by every xdist worker" in note for note in case["notes"])


ISOLATION_CASE = """
import pytest

@pytest.mark.llem(batch_size=2, max_new_tokens=2, num_prompts=2)
def test_busy(llem):
    llem.run()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "outcome"), [("warn", "passed"), ("skip", "skipped"), ("fail", "failed")]
)
def test_isolation_decides_what_foreign_processes_do(
    pytester: pytest.Pytester,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    outcome: str,
) -> None:
    from tests.fakes.fake_pynvml import FakeGpu, install

    gpu = FakeGpu(
        counter_step_s=0.01, processes=[(os.getpid(), 512 * 2**20), (424242, 20480 * 2**20)]
    )
    install(monkeypatch, [gpu])
    pytester.makepyfile(ISOLATION_CASE)
    result = pytester.runpytest(
        *QUICK, "--llem-meter=nvml", "--llem-baseline-s=0", f"--llem-isolation={mode}"
    )
    result.assert_outcomes(**{outcome: 1})
    (case,) = _record(pytester)["cases"]
    assert case["outcome"] == outcome
    isolation = case["isolation"]
    assert isolation["mode"] == mode
    assert [(p["pid"], p["memory_mb"]) for p in isolation["foreign"]] == [(424242, 20480.0)]
    assert any("pid 424242 on gpu0" in note for note in case["notes"])


@pytest.mark.slow
def test_an_isolated_gpu_is_recorded_as_such(
    pytester: pytest.Pytester, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.fake_pynvml import FakeGpu, install

    install(monkeypatch, [FakeGpu(counter_step_s=0.01, processes=[(os.getpid(), 512)])])
    pytester.makepyfile(ISOLATION_CASE)
    result = pytester.runpytest(
        *QUICK, "--llem-meter=nvml", "--llem-baseline-s=0", "--llem-isolation=fail"
    )
    result.assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    assert case["isolation"] == {
        "mode": "fail",
        "checked": True,
        "foreign": [],
        "unchecked": [],
        "note": None,
    }


TIMEOUT_CASES = """
import pytest

@pytest.mark.llem(batch_size=2, max_new_tokens=2, num_prompts=2)
def test_a_quick(llem):
    llem.run()

@pytest.mark.llem(batch_size=1, max_new_tokens=64, min_new_tokens=64, num_prompts=256)
def test_b_slow(llem):
    llem.run()

@pytest.mark.llem(batch_size=2, max_new_tokens=2, num_prompts=2)
def test_c_quick(llem):
    llem.run()
"""


@pytest.mark.slow
def test_a_case_past_the_timeout_fails_and_the_session_goes_on(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytester.makepyfile(TIMEOUT_CASES)
    result = pytester.runpytest(*QUICK, "--llem-meter=none", "--llem-timeout-s=4")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*CaseTimeoutError: the case ran longer than --llem-timeout-s=4 s*"]
    )
    cases = {case["name"]: case for case in _record(pytester)["cases"]}
    assert cases["test_b_slow"]["outcome"] == "failed"
    assert cases["test_b_slow"]["error"]["type"] == "CaseTimeoutError"
    assert cases["test_a_quick"]["outcome"] == "passed"
    assert cases["test_c_quick"]["outcome"] == "passed"
    assert cases["test_c_quick"]["load"]["reused"] is False  # the cache was cleaned up


SLOW_START_CONFTEST = """
import time

from tests.fakes.fake_backend import FakeBackend, FakeClock
from tests.fakes.fake_meter import FakeMeter

#: The levers: how long loading takes, and how long one generate call takes (real time).
LOAD_S = {load_s}
CALL_S = {call_s}


class Paced(FakeBackend):
    def load(self):
        time.sleep(LOAD_S)
        return super().load()

    def generate(self, requests, **kwargs):
        time.sleep(CALL_S)
        return super().generate(requests, **kwargs)


def pytest_llem_backend_names():
    return ["paced"]


def pytest_llem_meter_names():
    return ["steady"]


def pytest_llem_make_backend(name, case, progress):
    return Paced(FakeClock()) if name == "paced" else None


def pytest_llem_make_meter(name, config, options):
    return FakeMeter("steady", time.perf_counter, power_w={{"cpu": 10.0}}) if name == "steady" else None
"""

PACED_CASE = """
import pytest

@pytest.mark.llem(backend="paced", batch_size=2, max_new_tokens=2, num_prompts={prompts})
def test_paced(llem):
    llem.run()
"""


@pytest.mark.slow
def test_loading_and_the_idle_baseline_do_not_count_against_the_timeout(
    pytester: pytest.Pytester,
) -> None:
    # Loading and the baseline each take longer than the limit; the measurement itself does
    # one quick generate call per window, far inside it.
    pytester.makeconftest(SLOW_START_CONFTEST.format(load_s=3.0, call_s=0.0))
    pytester.makepyfile(PACED_CASE.format(prompts=2))
    result = pytester.runpytest(
        *QUICK, "--llem-meter=steady", "--llem-baseline-s=3", "--llem-timeout-s=2"
    )
    result.assert_outcomes(passed=1)
    (case,) = _record(pytester)["cases"]
    assert case["outcome"] == "passed"
    assert case["load"]["seconds"] >= 3.0
    assert case["baseline"]["seconds"] >= 3.0


@pytest.mark.slow
def test_the_timeout_covers_the_measurement(pytester: pytest.Pytester) -> None:
    # Ten generate calls of 0.5 s each: the measurement alone runs past the 2 s limit.
    pytester.makeconftest(SLOW_START_CONFTEST.format(load_s=0.0, call_s=0.5))
    pytester.makepyfile(PACED_CASE.format(prompts=20))
    result = pytester.runpytest(
        *QUICK, "--llem-meter=steady", "--llem-baseline-s=0", "--llem-timeout-s=2"
    )
    result.assert_outcomes(failed=1)
    (case,) = _record(pytester)["cases"]
    assert case["error"]["type"] == "CaseTimeoutError"


def _expire(*args: Any, **kwargs: Any) -> Any:
    from pytest_llem.harness.deadline import CaseTimeoutError

    raise CaseTimeoutError("the case ran longer than --llem-timeout-s=1 s")


@pytest.mark.parametrize("part", ["AutoTokenizer", "AutoModelForCausalLM"])
def test_a_timeout_while_loading_transformers_is_not_a_model_load_error(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    transformers = pytest.importorskip("transformers")
    from pytest_llem.backends.transformers import TransformersBackend
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.harness.deadline import CaseTimeoutError

    monkeypatch.setattr(getattr(transformers, part), "from_pretrained", _expire)
    backend = TransformersBackend(CaseConfig(model=str(tiny_model), device="cpu"))
    with pytest.raises(CaseTimeoutError, match="--llem-timeout-s"):
        backend.load()


def test_a_timeout_while_looking_up_a_hub_model_is_not_a_model_load_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = pytest.importorskip("huggingface_hub")
    pytest.importorskip("transformers")
    from pytest_llem.backends.transformers import TransformersBackend
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.harness.deadline import CaseTimeoutError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "snapshot_download", _expire)
    backend = TransformersBackend(CaseConfig(model="someorg/some-model", device="cpu"))
    with pytest.raises(CaseTimeoutError):
        backend.load()


def test_a_timeout_while_starting_vllm_or_tensorrt_is_not_a_model_load_error(
    tiny_model: Path,
) -> None:
    from types import SimpleNamespace

    from pytest_llem.backends.tensorrt import TensorRTBackend
    from pytest_llem.backends.vllm import VllmBackend
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.harness.deadline import CaseTimeoutError

    engine = SimpleNamespace(LLM=_expire)
    vllm = VllmBackend(CaseConfig(model=str(tiny_model), backend="vllm"))
    with pytest.raises(CaseTimeoutError):
        vllm._start_engine(engine, str(tiny_model), {})
    tensorrt = TensorRTBackend(CaseConfig(model=str(tiny_model), backend="tensorrt"))
    with pytest.raises(CaseTimeoutError):
        tensorrt._start_engine(engine, str(tiny_model), {})


def test_bad_scale_out_options_are_usage_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(ISOLATION_CASE)
    for args, message in (
        (["--llem-isolation=maybe"], "*--llem-isolation: expected one of warn, skip, fail*"),
        (["--llem-gpus=a"], "*--llem-gpus: 'a' is not a GPU index*"),
        (["--llem-timeout-s=-2"], "*--llem-timeout-s: expected seconds*"),
    ):
        result = pytester.runpytest(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([message])


TP_CASE = """
import pytest

@pytest.mark.llem(backend="vllm", batch_size=2, max_new_tokens=2, num_prompts=2)
def test_tp(llem):
    llem.run(**{"vllm.tensor_parallel_size": 2})
"""


@pytest.mark.slow
def test_a_tensor_parallel_case_needs_a_gpu_group(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.fake_pynvml import FakeGpu, install

    install(monkeypatch, [FakeGpu(uuid=f"GPU-{i}", counter_step_s=0.01) for i in range(4)])
    pytester.makepyfile(TP_CASE)
    result = pytester.runpytest(
        *QUICK, "--llem-gpus=1", "--llem-meter=nvml", "--llem-baseline-s=0", "-rs"
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*the case needs 2 GPUs (tensor x pipeline parallel) but this process sees 1 GPU(s)*"]
    )


OOM_CONFTEST = """
import pytest
from pytest_llem.backends.transformers import TransformersBackend
from pytest_llem.exceptions import RetryableError

FAILURES = {"left": 0}


class FlakyBackend(TransformersBackend):
    name = "flaky"
    loads = 0

    def load(self):
        FlakyBackend.loads += 1
        return super().load()

    def generate(self, requests, *, params, on_token=None):
        if FAILURES["left"] > 0:
            FAILURES["left"] -= 1
            raise RetryableError("out of memory (scripted)")
        return super().generate(requests, params=params, on_token=on_token)


def pytest_llem_backend_names():
    return ["flaky"]


def pytest_llem_make_backend(name, case, progress):
    if name == "flaky":
        return FlakyBackend(case, progress=progress)
    return None
"""

OOM_CASES = """
import pytest
from conftest import FAILURES, FlakyBackend

@pytest.mark.llem(backend="flaky", batch_size=2, max_new_tokens=2, num_prompts=2)
def test_a_once(llem):
    FAILURES["left"] = 1
    llem.run()
    assert FlakyBackend.loads == 2  # the cache was freed and the model loaded again

@pytest.mark.llem(backend="flaky", batch_size=2, max_new_tokens=2, num_prompts=2)
def test_b_always(llem):
    FAILURES["left"] = 99
    llem.run()

@pytest.mark.llem(backend="flaky", batch_size=2, max_new_tokens=2, num_prompts=2)
def test_c_after(llem):
    FAILURES["left"] = 0
    llem.run()
"""


@pytest.mark.slow
def test_out_of_memory_is_retried_once_then_fails_locally(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytester.makeconftest(OOM_CONFTEST)
    pytester.makepyfile(OOM_CASES)
    result = pytester.runpytest(*QUICK, "--llem-meter=none")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*RetryableError: out of memory (scripted)*"])
    cases = {case["name"]: case for case in _record(pytester)["cases"]}
    assert cases["test_a_once"]["outcome"] == "passed"
    assert cases["test_b_always"]["outcome"] == "failed"
    assert cases["test_b_always"]["error"]["type"] == "RetryableError"
    assert cases["test_c_after"]["outcome"] == "passed"


def test_measuring_more_gpus_than_the_case_uses_is_noted() -> None:
    from pytest_llem.config.models import CaseConfig
    from pytest_llem.harness.resources import unused_gpus_note as _unused_gpus_note
    from pytest_llem.results.models import MeterRecord

    nvml = MeterRecord(
        name="nvml",
        domains=["gpu"],
        sources={"gpu": "measured"},
        devices=[f"gpu{i}: H100" for i in range(4)],
        used_for=["gpu"],
    )
    case = CaseConfig(device="cuda")
    note = _unused_gpus_note(case, "cuda:0", [nvml], {"gpu": "nvml"})
    assert note is not None
    assert note.startswith("nvml measures all 4 visible GPUs but the case uses 1")
    assert _unused_gpus_note(case, "cpu", [nvml], {"gpu": "nvml"}) is None
    one = nvml.model_copy(update={"devices": ["gpu0: H100"]})
    assert _unused_gpus_note(case, "cuda:0", [one], {"gpu": "nvml"}) is None
