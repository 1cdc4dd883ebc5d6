"""The reproducibility manifest: GPU settings from the fake NVML (values and units), the
container, the Python environment and its digest, the record carrying it, and comparisons that
warn when two runs' manifests differ in what changes energy."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_llem.cli import main
from pytest_llem.finish import run_record
from pytest_llem.manifest import (
    CONTAINER_IMAGE_ENV,
    container_info,
    packages_digest,
    python_environment,
    this_manifest,
)
from pytest_llem.meters.inventory import device_manifest
from pytest_llem.results.compare import environment_differences, manifest_differences
from pytest_llem.results.models import (
    CaseRecord,
    ContainerInfo,
    GpuManifest,
    MachineInfo,
    ProfileRecord,
    PythonEnvironment,
    RunManifest,
    RunRecord,
)
from tests.fakes import fake_pynvml
from tests.fakes.fake_pynvml import FakeGpu

DIGEST = "sha256:" + "ab" * 32


def test_gpu_settings_come_from_nvml_in_watts_and_megahertz(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = [
        FakeGpu(uuid="GPU-aaaa", power_limit_w=350.0, default_power_limit_w=700.0),
        FakeGpu(
            uuid="GPU-bbbb",
            application_sm_clock_mhz=1410,
            application_memory_clock_mhz=1593,
            persistence_mode=fake_pynvml.NVML_FEATURE_DISABLED,
            ecc_mode=fake_pynvml.NVML_FEATURE_DISABLED,
            mig_mode=fake_pynvml.NVML_DEVICE_MIG_ENABLE,
        ),
    ]
    fake_pynvml.install(monkeypatch, gpus, driver="575.51.03", cuda_driver_version=12090)

    found = device_manifest()

    assert (found.driver_version, found.cuda_driver_version, found.note) == (
        "575.51.03",
        "12.9",
        None,
    )
    first, second = found.gpus
    assert (first.power_limit_w, first.default_power_limit_w) == (350.0, 700.0)  # from mW
    assert (first.application_sm_clock_mhz, first.application_memory_clock_mhz) == (1755, 2619)
    assert (first.persistence_mode, first.ecc_enabled, first.mig_enabled) == (True, True, False)
    assert (second.application_sm_clock_mhz, second.application_memory_clock_mhz) == (1410, 1593)
    assert (second.persistence_mode, second.ecc_enabled, second.mig_enabled) == (
        False,
        False,
        True,
    )
    assert (first.uuid, first.unknown, second.index) == ("GPU-aaaa", {}, 1)


def test_a_setting_nvml_cannot_give_is_none_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_pynvml.install(
        monkeypatch,
        [FakeGpu(unsupported={"nvmlDeviceGetEccMode"})],
        missing=["nvmlDeviceGetApplicationsClock"],
    )

    gpu = device_manifest().gpus[0]

    assert gpu.ecc_enabled is None
    assert gpu.unknown["ecc_enabled"] == "not supported on this GPU or driver"
    assert gpu.application_sm_clock_mhz is None
    assert gpu.unknown["application_sm_clock_mhz"] == "not in this nvidia-ml-py"
    assert gpu.power_limit_w == 700.0


def test_the_manifest_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pynvml.install(
        monkeypatch,
        [FakeGpu(uuid="GPU-aaaa"), FakeGpu(uuid="GPU-bbbb", power_limit_w=300.0)],
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")

    gpus = device_manifest().gpus

    assert [(g.index, g.uuid, g.power_limit_w) for g in gpus] == [(0, "GPU-bbbb", 300.0)]


def test_without_nvml_the_manifest_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pynvml.install(monkeypatch, library_found=False)

    found = device_manifest()

    assert (found.gpus, found.driver_version) == ([], None)
    assert found.note == "NVML library not found (no NVIDIA driver)"


def test_no_container_marker_means_not_detected(tmp_path: Path) -> None:
    found = container_info(filesystem_root=tmp_path, environ={})

    assert found == ContainerInfo(detected=False)


def test_docker_with_a_given_digest(tmp_path: Path) -> None:
    (tmp_path / ".dockerenv").touch()

    found = container_info(
        filesystem_root=tmp_path, environ={CONTAINER_IMAGE_ENV: f"ghcr.io/org/bench@{DIGEST}"}
    )

    assert (found.detected, found.runtime, found.image, found.image_digest, found.note) == (
        True,
        "docker",
        "ghcr.io/org/bench",
        DIGEST,
        None,
    )
    assert found.evidence == ["/.dockerenv exists", f"{CONTAINER_IMAGE_ENV} is set"]


def test_a_digest_is_never_invented(tmp_path: Path) -> None:
    (tmp_path / ".dockerenv").touch()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".containerenv").write_text('engine="podman-5"\nimage="quay.io/x:1"\n')

    unknown = container_info(filesystem_root=tmp_path, environ={})
    tag_only = container_info(filesystem_root=tmp_path, environ={CONTAINER_IMAGE_ENV: "img:1"})
    bad = container_info(filesystem_root=tmp_path, environ={CONTAINER_IMAGE_ENV: "img@sha256:1"})

    assert (unknown.image, unknown.image_digest) == ("quay.io/x:1", None)
    assert CONTAINER_IMAGE_ENV in (unknown.note or "")
    assert (tag_only.image, tag_only.image_digest) == ("img:1", None)
    assert "names no digest" in (tag_only.note or "")
    assert (bad.image, bad.image_digest) == ("img", None)
    assert "not sha256" in (bad.note or "")


def test_a_bare_digest_and_kubernetes(tmp_path: Path) -> None:
    found = container_info(
        filesystem_root=tmp_path,
        environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", CONTAINER_IMAGE_ENV: DIGEST.upper()},
    )

    assert (found.detected, found.runtime, found.image, found.image_digest) == (
        True,
        "kubernetes",
        None,
        DIGEST,
    )


def test_the_package_digest_is_sha256_of_the_sorted_lines() -> None:
    packages = {"torch": "2.13.0", "a-b": "1", "a": "2"}
    by_hand = hashlib.sha256(b"a-b==1\na==2\ntorch==2.13.0").hexdigest()

    assert packages_digest(packages) == f"sha256:{by_hand}"
    assert packages_digest(dict(reversed(list(packages.items())))) == f"sha256:{by_hand}"
    assert packages_digest({**packages, "torch": "2.14.0"}) != f"sha256:{by_hand}"


def test_the_python_environment_lists_installed_packages() -> None:
    env = python_environment()

    assert env.packages["pydantic"]
    assert env.packages["pytest"]
    assert list(env.packages) == sorted(env.packages)
    assert env.packages_digest == packages_digest(env.packages)


def test_the_run_record_carries_the_manifest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pynvml.install(monkeypatch, [FakeGpu(power_limit_w=500.0)])
    session = SimpleNamespace(
        run_id="r1",
        started_at=datetime(2026, 1, 2, tzinfo=timezone.utc),
        cases=[CaseRecord(id="a", name="a")],
        baseline=None,
        options=SimpleNamespace(
            given={}, profile=ProfileRecord(name="smoke", reason="--llem-profile=smoke")
        ),
        shard=None,
    )

    record = run_record(session, root=tmp_path)  # type: ignore[arg-type]

    assert record.manifest is not None
    assert record.manifest.gpus[0].power_limit_w == 500.0
    assert record.manifest.cuda_driver_version == "13.0"
    assert record.manifest.profile == "smoke"
    assert record.profile is not None
    assert record.profile.reason == "--llem-profile=smoke"
    assert record.manifest.git_commit == record.machine.git_commit
    again = RunRecord.model_validate_json(record.model_dump_json())
    assert again.manifest == record.manifest
    assert again.schema_version == "1.0"


def test_this_manifest_takes_the_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_pynvml.install(monkeypatch, [])

    manifest = this_manifest(tmp_path, profile="smoke")

    assert (manifest.profile, manifest.gpus) == ("smoke", [])
    assert manifest.gpu_note == "no NVIDIA GPU visible"


# --- comparing ------------------------------------------------------------------------------


def manifest(**gpu: object) -> RunManifest:
    settings: dict[str, object] = {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "power_limit_w": 700.0,
        "application_sm_clock_mhz": 1755.0,
        "application_memory_clock_mhz": 2619.0,
        "ecc_enabled": True,
        "mig_enabled": False,
        "persistence_mode": True,
        **gpu,
    }
    return RunManifest(
        driver_version="580.159.04",
        cuda_driver_version="13.0",
        gpus=[GpuManifest.model_validate(settings)],
        container=ContainerInfo(detected=False),
        python=PythonEnvironment(
            version="3.11", implementation="CPython", packages={}, packages_digest="sha256:0"
        ),
    )


def run(m: RunManifest | None) -> RunRecord:
    return RunRecord(
        run_id="r",
        created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        machine=MachineInfo(hostname="h", platform="linux", python="3.11"),
        manifest=m,
    )


def test_a_power_limit_difference_is_an_environment_difference() -> None:
    found = environment_differences(run(manifest()), run(manifest(power_limit_w=350.0)))

    assert found == ["GPU power limit differs on GPU 0: baseline 700 W, current 350 W"]


def test_equal_manifests_differ_in_nothing() -> None:
    assert environment_differences(run(manifest()), run(manifest())) == []
    # Persistence mode and the Python environment do not move a window's energy by themselves.
    assert manifest_differences(manifest(), manifest(persistence_mode=False)) == []


def test_clocks_ecc_mig_and_cuda_differences_are_named() -> None:
    other = manifest(application_sm_clock_mhz=1410.0, ecc_enabled=False, mig_enabled=True)
    other.cuda_driver_version = "12.8"

    found = manifest_differences(manifest(), other)

    assert found == [
        "CUDA driver version differs: baseline 13.0, current 12.8",
        "GPU application SM clock differs on GPU 0: baseline 1755 MHz, current 1410 MHz",
        "GPU ECC mode differs on GPU 0: baseline on, current off",
        "GPU MIG mode differs on GPU 0: baseline off, current on",
    ]


def test_a_setting_either_run_could_not_read_is_not_compared() -> None:
    assert manifest_differences(manifest(), manifest(power_limit_w=None)) == []
    assert environment_differences(run(manifest()), run(None)) == []


def test_engine_versions_and_driver_come_from_the_manifest_where_the_machine_lacks_them() -> None:
    old, new = manifest(), manifest()
    old.python.packages = {"vllm": "0.9.0"}
    new.python.packages = {"vllm": "0.10.1"}
    new.driver_version = "590.1"

    found = environment_differences(run(old), run(new))

    assert "GPU driver differs: baseline 580.159.04, current 590.1" in found
    assert "vllm differs: baseline 0.9.0, current 0.10.1" in found


def _write(path: Path, record: RunRecord) -> str:
    path.write_text(record.model_dump_json(), encoding="utf-8")
    return str(path)


def test_llem_compare_warns_on_a_power_limit_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _write(tmp_path / "base.json", run(manifest()))
    cur = _write(tmp_path / "cur.json", run(manifest(power_limit_w=350.0)))

    assert main(["compare", base, cur]) == 0
    err = capsys.readouterr().err
    assert "llem compare: warning: the runs differ: GPU power limit differs on GPU 0" in err
    assert main(["compare", base, cur, "--strict"]) == 1
    assert "refusing to compare" in capsys.readouterr().err


def test_llem_compare_does_not_warn_for_equal_manifests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _write(tmp_path / "base.json", run(manifest()))
    cur = _write(tmp_path / "cur.json", run(manifest()))

    assert main(["compare", base, cur]) == 0
    assert "the runs differ" not in capsys.readouterr().err


def test_a_merged_record_keeps_each_sources_manifest() -> None:
    from pytest_llem.report.loading import merge_runs

    same = merge_runs([run(manifest()), run(manifest())])
    mixed = merge_runs([run(manifest()), run(manifest(power_limit_w=350.0))])

    assert same.manifest == manifest()
    assert mixed.manifest is None
    limits = [s["manifest"]["gpus"][0]["power_limit_w"] for s in mixed.options["merged"]]
    assert limits == [700.0, 350.0]


def test_the_html_report_shows_the_manifest() -> None:
    from pytest_llem.report.html import render_html

    m = manifest(power_limit_w=350.0, default_power_limit_w=700.0, ecc_enabled=None)
    m.gpus[0].unknown["ecc_enabled"] = "not supported on this GPU or driver"
    m.container = ContainerInfo(detected=True, runtime="docker", image="<img>", image_digest=DIGEST)

    page = render_html(run(m))

    card = page.split('id="manifest"', 1)[1].split("</div>", 1)[0]
    assert "350 W (default 700 W)" in card
    assert "1755 MHz / 2619 MHz" in card
    assert "docker: &lt;img&gt;, " + DIGEST in card
    assert 'title="ecc_enabled: not supported on this GPU or driver"' in card
    assert "<img>" not in page
    assert 'id="manifest"' not in render_html(run(None))


def test_the_end_of_run_comparison_warns_on_a_power_limit_difference(tmp_path: Path) -> None:
    from pytest_llem.finish import Finish, _compare
    from pytest_llem.options.model import CompareBaseline

    store = SimpleNamespace(rules=(), gate_estimated=False, strict=False, fail_inconclusive=False)
    loaded = CompareBaseline(record=run(manifest()), path=tmp_path / "base.json")
    warned, same = Finish(), Finish()

    _compare(run(manifest(power_limit_w=350.0)), loaded, store, warned)  # type: ignore[arg-type]
    _compare(run(manifest()), loaded, store, same)  # type: ignore[arg-type]

    assert any("GPU power limit differs on GPU 0" in line for line in warned.warnings)
    assert not any("differ" in line for line in same.warnings)
