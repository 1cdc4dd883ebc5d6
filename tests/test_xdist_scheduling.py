"""The work behind the plugin's xdist hooks, on stand-in configs: when the controller picks
loadgroup scheduling and names its scratch file, what workers are told, GPU pinning of one
process, ``-n auto`` and the clean-up. End to end under xdist: test_scale_out.py."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import pytest_llem.plugin
from pytest_llem import xdist_scheduling
from pytest_llem.exceptions import ConfigurationError
from pytest_llem.xdist_scheduling import (
    GROUPS_FILE,
    auto_num_workers,
    configure_node,
    dist_given,
    make_scheduler,
    remove_groups_file,
    scale_out,
    write_groups,
)


def _config(*args: str, workerinput: dict[str, Any] | None = None, **option: Any) -> Any:
    config = SimpleNamespace(
        invocation_params=SimpleNamespace(args=args),
        option=SimpleNamespace(**option),
        stash=pytest.Stash(),
    )
    if workerinput is not None:
        config.workerinput = workerinput
    return config


@pytest.fixture
def visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinning writes ``CUDA_VISIBLE_DEVICES``: start without it and restore it afterwards."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.parametrize(
    ("args", "given"),
    [
        ((), False),
        (("-n", "2"), False),
        (("--dist", "load"), True),
        (("--dist=each",), True),
        (("-dload",), True),
    ],
)
def test_dist_given_reads_the_command_line(args: tuple[str, ...], given: bool) -> None:
    assert dist_given(_config(*args)) is given


def test_a_controller_with_default_dist_schedules_load_groups() -> None:
    config = _config("-n", "2", numprocesses=2, dist="load")
    scale_out(config, None)
    assert config.option.dist == "loadgroup"
    groups_file = config.stash[GROUPS_FILE]
    assert groups_file.parent.is_dir()
    node = SimpleNamespace(config=config, workerinput={})
    configure_node(node)
    assert node.workerinput == {"llem_loadgroup": True, "llem_groups_file": str(groups_file)}
    remove_groups_file(config)
    assert not groups_file.parent.exists()


def test_a_dist_the_user_chose_is_kept() -> None:
    config = _config("-n", "2", "--dist=load", numprocesses=2, dist="load")
    scale_out(config, None)
    assert config.option.dist == "load"
    assert GROUPS_FILE not in config.stash
    assert make_scheduler(config, log=None) is None  # xdist's own scheduler
    node = SimpleNamespace(config=config, workerinput={})
    configure_node(node)
    assert node.workerinput == {"llem_loadgroup": False}
    remove_groups_file(config)  # nothing to remove: no error


def test_a_worker_takes_the_controllers_choice(visible_devices: None) -> None:
    config = _config(workerinput={"workerid": "gw1", "workercount": 2, "llem_loadgroup": True})
    scale_out(config, ((0,), (1, 2)))
    assert config.option.loadgroup is True
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"


def test_one_process_without_xdist_is_pinned_to_the_first_group(
    visible_devices: None, caplog: pytest.LogCaptureFixture
) -> None:
    scale_out(_config(), ((3,), (4,)))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert "only the first group is used" in caplog.text


def test_more_workers_than_gpu_groups_is_a_configuration_error(visible_devices: None) -> None:
    config = _config("-n", "3", numprocesses=3, dist="no")
    with pytest.raises(ConfigurationError, match="2 GPU group"):
        scale_out(config, ((0,), (1,)))
    scale_out(_config("-n", "2", numprocesses=2, dist="no"), ((0,), (1,)))
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the controller pins nobody


@pytest.mark.parametrize(
    ("args", "ini", "workers"),
    [(["--llem-gpus=0,1,2"], "", 3), ([], "0-1,2-3", 2), ([], "", None), ([], "0,x", None)],
)
def test_auto_workers_follow_the_gpu_groups(
    pytester: pytest.Pytester, args: list[str], ini: str, workers: int | None
) -> None:
    if ini:
        pytester.makeini(f"[pytest]\nllem_gpus = {ini}\n")
    config = pytester.parseconfig(*args)
    assert auto_num_workers(config) == workers


def test_write_groups_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "groups.json"
    write_groups(path, {"a": "g1"})
    write_groups(path, {"a": "g2", "b": "g2"})
    assert path.read_text(encoding="utf-8") == '{"a": "g2", "b": "g2"}'
    assert [p.name for p in tmp_path.iterdir()] == ["groups.json"]  # no temporary left


def test_the_plugins_xdist_hooks_delegate_here(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(xdist_scheduling, "auto_num_workers", lambda config: calls.append("n"))
    monkeypatch.setattr(xdist_scheduling, "configure_node", lambda node: calls.append("node"))
    monkeypatch.setattr(
        xdist_scheduling, "make_scheduler", lambda config, log: calls.append("scheduler")
    )
    pytest_llem.plugin.pytest_xdist_auto_num_workers(config=None)  # type: ignore[arg-type]
    pytest_llem.plugin.pytest_configure_node(node=None)
    pytest_llem.plugin.pytest_xdist_make_scheduler(config=None, log=None)  # type: ignore[arg-type]
    assert calls == ["n", "node", "scheduler"]
