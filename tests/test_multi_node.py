"""Engines that span nodes: vLLM's ``distributed_executor_backend`` reaches the engine, and a case
whose engine may run on GPUs this process cannot measure (Ray, or more ranks than visible GPUs)
is flagged ``multi_node`` in the record, the terminal table and the HTML report."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_llem.backends.vllm import VllmBackend
from pytest_llem.config.models import CaseConfig
from pytest_llem.exceptions import BackendConfigError, ConfigurationError, NotEnoughGpusError
from pytest_llem.harness.resources import check_gpu_count, multi_node_note
from tests.fakes.fake_pynvml import FakeGpu, install
from tests.fakes.fake_vllm import FakeEngineArgs, FakeLLM, fake_vllm_modules

pytest_plugins = ["pytester"]

QUICK = ["-p", "no:cacheprovider", "--llem-warmup=0", "--llem-repeat=1", "--llem-meter=none"]

CASES = """
import pytest

CASE = dict(backend="vllm", model={model!r}, device="cpu", batch_size=2, max_new_tokens=2,
            min_new_tokens=2, num_prompts=2)


@pytest.mark.llem(**CASE, **{{"vllm.distributed_executor_backend": "ray"}})
def test_ray(llem):
    llem.run()


@pytest.mark.llem(**CASE)
def test_local(llem):
    llem.run()
"""


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's modules replaced by the fake engine, and its record of starts emptied."""
    for name, module in fake_vllm_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(FakeLLM, "started", [])


@pytest.mark.usefixtures("fake_vllm")
def test_a_ray_case_reaches_the_engine_and_is_flagged_multi_node(
    pytester: pytest.Pytester, tiny_model: Path
) -> None:
    pytester.makepyfile(CASES.format(model=str(tiny_model)))
    result = pytester.runpytest(*QUICK)
    result.assert_outcomes(passed=2)
    started = {args.get("distributed_executor_backend") for args in FakeLLM.started}
    assert started == {"ray", None}  # the setting reached vllm.LLM; unset keeps vLLM's choice
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    cases = {case["name"]: case for case in record["cases"]}
    ray, local = cases["test_ray"], cases["test_local"]
    assert ray["multi_node"] is True
    assert ray["params"]["vllm"]["distributed_executor_backend"] == "ray"
    assert any(
        note.startswith("multi-node: vllm.distributed_executor_backend=ray")
        and "other nodes' GPUs are not measured" in note
        for note in ray["notes"]
    )
    assert local["multi_node"] is False
    assert not any(note.startswith("multi-node") for note in local["notes"])
    result.stdout.fnmatch_lines(["*test_ray (multi-node)*", "multi-node (*): test_ray"])
    html = (pytester.path / "reports" / "llem-report.html").read_text()
    assert html.count("Multi-node: the engine may run on GPUs") == 1


def _vllm(device: str = "cuda", **settings: object) -> CaseConfig:
    return CaseConfig(backend="vllm", device=device, vllm=settings)


def test_ranks_beyond_the_visible_gpus_are_multi_node(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [FakeGpu(uuid=f"GPU-{i}") for i in range(2)])
    launched = _vllm(tensor_parallel_size=4, distributed_executor_backend="external_launcher")
    check_gpu_count(launched)  # the launcher places the ranks: not refused
    note = multi_node_note(launched)
    assert note is not None
    assert "runs 4 parallel ranks (tensor x pipeline) but this process sees 2 GPU(s)" in note
    ray = _vllm(
        tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="ray"
    )
    check_gpu_count(ray)
    assert "distributed_executor_backend=ray" in str(multi_node_note(ray))
    local = _vllm(tensor_parallel_size=2, distributed_executor_backend="mp")
    assert multi_node_note(local) is None
    with pytest.raises(NotEnoughGpusError):
        check_gpu_count(_vllm(tensor_parallel_size=4, distributed_executor_backend="mp"))
    assert multi_node_note(_vllm(tensor_parallel_size=2)) is None


def test_the_executor_is_one_of_vllms_and_an_old_vllm_refuses_it() -> None:
    with pytest.raises((ConfigurationError, ValueError), match="distributed_executor_backend"):
        _vllm(distributed_executor_backend="slurm")
    fields = [
        (f.name, f.type, f.default)
        for f in dataclasses.fields(FakeEngineArgs)
        if f.name != "distributed_executor_backend"
    ]
    old = SimpleNamespace(EngineArgs=dataclasses.make_dataclass("EngineArgs", fields))
    old.__version__ = "0.5.0"
    backend = VllmBackend(_vllm(device="cpu", distributed_executor_backend="ray"))
    with pytest.raises(BackendConfigError, match="does not take this setting") as caught:
        backend._engine_kwargs(old, dtype="float32")
    assert caught.value.param == "vllm.distributed_executor_backend"
    kwargs = backend._engine_kwargs(fake_vllm_modules()["vllm"], dtype="float32")
    assert kwargs["distributed_executor_backend"] == "ray"
