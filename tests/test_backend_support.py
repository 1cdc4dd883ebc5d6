"""The backend support layer, once for every engine: model sources and checkpoint facts,
prompt ids and vocabularies, peak memory from /proc, out-of-memory detection, progress lines,
the engine-scheduled base and the asyncio loop thread. No engine is imported.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import struct
import sys
import threading
import types
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import pytest_llem.data
from pytest_llem.backends.base import GenerateParams, Generation, TokenCallback
from pytest_llem.backends.support import (
    CASE_DTYPES,
    EngineAdapter,
    EngineScheduledBackend,
    EventLoopThread,
    checkpoint_config_value,
    count_parameters,
    count_prompt_tokens,
    engine_failure,
    first_line,
    is_out_of_memory,
    lifetime_peak_rss,
    load_errors,
    local_folder,
    proc_file,
    prompt_ids,
    read_vm_hwm_kib,
    report,
    require_loaded,
    reset_peak_rss,
    resolve_model_source,
    says_out_of_memory,
    tokenizer_vocabulary,
)
from pytest_llem.backends.support import checkpoint as checkpoint_module
from pytest_llem.backends.support.scheduling import gather
from pytest_llem.config.models import CaseConfig
from pytest_llem.data.requests import Request
from pytest_llem.exceptions import (
    BackendInferenceError,
    BackendTimeoutError,
    ModelLoadError,
    RetryableError,
)

# -- out of memory and engine failures ---------------------------------------------------------


def test_out_of_memory_is_recognised_through_the_cause_chain() -> None:
    kv = ValueError("No available memory for the cache blocks. Try increasing ...")
    assert is_out_of_memory(kv)
    wrapped = RuntimeError("Engine core initialization failed. See root cause above.")
    wrapped.__cause__ = MemoryError()
    assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(ValueError("unknown quantization method"))


def test_parameters_are_counted_from_safetensors_headers(tmp_path: Path) -> None:
    _safetensors(
        tmp_path / "model-00001-of-00002.safetensors",
        {"model.embed_tokens.weight": [100, 8], "model.layers.0.mlp.weight": [8, 16]},
    )
    _safetensors(tmp_path / "model-00002-of-00002.safetensors", {"lm_head.weight": [100, 8]})
    assert count_parameters(str(tmp_path)) == (1728, 928)


def test_parameters_unknown_without_a_folder_or_embedding(tmp_path: Path) -> None:
    assert count_parameters("org/model") is None
    assert count_parameters(str(tmp_path)) is None
    _safetensors(tmp_path / "model.safetensors", {"w": [4, 4]})
    assert count_parameters(str(tmp_path)) == (16, None)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8)
    assert count_parameters(str(tmp_path)) is None


def test_out_of_memory_by_torch_type_and_engine_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    monkeypatch.setitem(
        sys.modules, "torch", types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError)
    )
    assert is_out_of_memory(OutOfMemoryError("Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[TensorRT-LLM][ERROR] CUDA_ERROR_OUT_OF_MEMORY"))
    assert is_out_of_memory(RuntimeError("std::bad_alloc: OutOfMemory"))
    assert is_out_of_memory(OSError("[Errno 12] Cannot allocate memory"))
    assert not is_out_of_memory(RuntimeError("an illegal memory access was encountered"))


def test_out_of_memory_in_a_message_alone() -> None:
    # A server's error body is text, with no exception type to go by.
    assert says_out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert says_out_of_memory("CUDA_ERROR_OUT_OF_MEMORY")
    assert says_out_of_memory("No available memory for the cache blocks")
    assert not says_out_of_memory("an illegal memory access was encountered")
    assert not says_out_of_memory("")


def test_a_cause_chain_that_loops_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__cause__, second.__cause__ = second, first
    assert not is_out_of_memory(first)


def test_engine_failure_names_the_engine_the_step_and_the_kind() -> None:
    timeout = BackendTimeoutError("the case ran past 5 s")
    assert engine_failure(timeout, backend="x", what="a step") is timeout
    oom = engine_failure(
        RuntimeError("CUDA out of memory\n(traceback)"),
        backend="x",
        what="request 3",
        memory="GPU memory",
    )
    assert isinstance(oom, RetryableError)
    assert str(oom) == "x: out of GPU memory during request 3: CUDA out of memory"
    other = engine_failure(ValueError("bad\nmore"), backend="x", what="an engine step")
    assert type(other) is BackendInferenceError
    assert str(other) == "x: an engine step failed: ValueError: bad"


def test_load_errors_sort_what_an_engine_raises_while_loading() -> None:
    def describe(error: Exception) -> str:
        return f"cannot load m: {error}"

    with pytest.raises(BackendTimeoutError), load_errors(backend="x", model="m", describe=describe):
        raise BackendTimeoutError("the case ran past 5 s")
    with (
        pytest.raises(RetryableError, match=r"^x: out of GPU memory while loading 'm': CUDA oom$"),
        load_errors(backend="x", model="m", describe=describe, memory="GPU memory"),
    ):
        raise RuntimeError("CUDA oom\nCUDA out of memory")
    with (
        pytest.raises(ModelLoadError, match=r"^cannot load m: unknown architecture$") as caught,
        load_errors(backend="x", model="m", describe=describe),
    ):
        raise ValueError("unknown architecture")
    assert isinstance(caught.value.__cause__, ValueError)


def test_first_line_and_require_loaded() -> None:
    assert first_line(ValueError("  one\ntwo")) == "one"
    assert first_line(ValueError()) == ""
    assert require_loaded("engine", backend="x", what="generate") == "engine"
    with pytest.raises(BackendInferenceError, match=r"^x: generate\(\) called before load\(\)$"):
        require_loaded(None, backend="x", what="generate")


# -- model sources and checkpoints ---------------------------------------------------------------


def test_model_source_folder_file_path_and_hub_id(tmp_path: Path) -> None:
    found = resolve_model_source(str(tmp_path))
    assert (found.source, found.folder, found.is_hub_id) == (
        str(tmp_path),
        str(tmp_path.resolve()),
        False,
    )
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model_source(str(tmp_path / "weights.bin"))
    for missing in (str(tmp_path / "nope"), "./nope", "~/nope-llem", "a/b/c"):
        with pytest.raises(ModelLoadError, match=r"not a folder \(no such path\)"):
            resolve_model_source(missing)
    hub = resolve_model_source("org/model")
    assert (hub.source, hub.folder, hub.is_hub_id) == ("org/model", None, True)


def test_local_folder_names_only_folders_that_are_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    expected = str((tmp_path / "model").resolve())
    assert local_folder(str(tmp_path / "model")) == expected
    assert local_folder("~/model") == expected
    for absent in (None, "", str(tmp_path / "weights.bin"), "~/nope", "org/model", "llem-tiny"):
        assert local_folder(absent) is None


def test_model_source_builds_the_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    told: list[str] = []

    def build(*, progress: Any = None) -> Path:
        progress("building")
        return tmp_path

    monkeypatch.setattr(checkpoint_module, "ensure_tiny_model", build)
    found = resolve_model_source("llem-tiny", progress=told.append)
    assert (found.source, found.folder) == (str(tmp_path), str(tmp_path))
    assert told == ["building"]


def test_embedding_tensors_are_matched_by_whole_name(tmp_path: Path) -> None:
    _safetensors(
        tmp_path / "model.safetensors",
        {"transformer.wte.weight": [10, 4], "embed_in.weight": [2, 2], "xwte.weight": [3, 1]},
    )
    assert count_parameters(str(tmp_path)) == (47, 3)
    assert count_parameters(None) is None


def test_checkpoint_config_values(tmp_path: Path) -> None:
    assert checkpoint_config_value(str(tmp_path), "vocab_size") is None
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32, "torch_dtype": "bfloat16"}))
    assert checkpoint_config_value(str(tmp_path), "vocab_size") == 32
    assert checkpoint_config_value(str(tmp_path), "missing") is None
    assert checkpoint_config_value(None, "vocab_size") is None
    (tmp_path / "config.json").write_text("[1, 2]")
    assert checkpoint_config_value(str(tmp_path), "vocab_size") is None


# -- prompt ids and vocabularies -----------------------------------------------------------------


class _Encoder:
    """Words as ids (BOS 1, then 10 + the word's length); counts its calls."""

    def __init__(self, truncate_to: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.truncate_to = truncate_to

    def __call__(self, texts: list[str]) -> list[list[int]]:
        self.calls.append(texts)
        rows = [[1] + [10 + len(word) for word in text.split()] for text in texts]
        return [row[: self.truncate_to] for row in rows] if self.truncate_to else rows


def test_prompt_ids_mix_texts_and_token_ids_in_order() -> None:
    encode = _Encoder()
    requests = [Request(0, "a bb"), Request(1, "ids", token_ids=(5, 6, 7)), Request(2, "ccc")]
    rows = prompt_ids(
        requests, encode=encode, vocabulary_size=100, max_input_tokens=None, backend="x"
    )
    assert rows == [[1, 11, 12], [5, 6, 7], [1, 13]]
    assert encode.calls == [["a bb", "ccc"]], "texts are tokenised in one call"


@pytest.mark.parametrize(
    ("side", "expected"), [("right", [[1, 11], [5, 6]]), ("left", [[11, 12], [6, 7]])]
)
def test_prompt_ids_truncate_on_the_tokenizer_side(side: str, expected: list[list[int]]) -> None:
    requests = [Request(0, "a bb"), Request(1, "ids", token_ids=(5, 6, 7))]
    rows = prompt_ids(
        requests,
        encode=_Encoder(),
        vocabulary_size=100,
        max_input_tokens=2,
        truncation_side=side,
        backend="x",
    )
    assert rows == expected


def test_an_encoder_that_truncates_gives_the_same_ids() -> None:
    requests = [Request(0, "a bb ccc dddd")]
    kwargs: dict[str, Any] = {"vocabulary_size": 100, "max_input_tokens": 3, "backend": "x"}
    assert prompt_ids(requests, encode=_Encoder(truncate_to=3), **kwargs) == prompt_ids(
        requests, encode=_Encoder(), **kwargs
    )


@pytest.mark.parametrize(
    ("token_ids", "match"),
    [((), "empty token_ids"), ((3, 10), r"outside the vocabulary \(0\.\.9\)")],
)
def test_token_id_prompts_are_checked(token_ids: tuple[int, ...], match: str) -> None:
    with pytest.raises(BackendInferenceError, match=f"x: request 4 .*{match}"):
        prompt_ids(
            [Request(4, "ids", token_ids=token_ids)],
            encode=_Encoder(),
            vocabulary_size=10,
            max_input_tokens=None,
            backend="x",
        )


def test_tokenizer_failures_become_inference_errors() -> None:
    def broken(texts: list[str]) -> list[list[int]]:
        raise ValueError("no such token")

    with pytest.raises(BackendInferenceError, match="x: tokenizing failed: no such token"):
        count_prompt_tokens(["a"], encode=broken, backend="x")

    def timed_out(texts: list[str]) -> list[list[int]]:
        raise BackendTimeoutError("the case ran past 5 s")

    with pytest.raises(BackendTimeoutError):
        prompt_ids(
            [Request(0, "a")],
            encode=timed_out,
            vocabulary_size=9,
            max_input_tokens=None,
            backend="x",
        )


def test_count_prompt_tokens_counts_what_the_encoder_adds() -> None:
    encode = _Encoder()
    assert count_prompt_tokens(["a bb", ""], encode=encode, backend="x") == [3, 1]
    assert count_prompt_tokens([], encode=encode, backend="x") == []
    assert len(encode.calls) == 1, "no call for no texts"


class _Tokenizer:
    all_special_ids = (0, 2, 5000)
    added_tokens_decoder = {  # noqa: RUF012
        7: types.SimpleNamespace(special=True),
        8: types.SimpleNamespace(special=False),
        9000: types.SimpleNamespace(special=True),
    }

    def __len__(self) -> int:
        return 1000


def test_vocabulary_is_the_overlap_of_tokenizer_and_model() -> None:
    smaller_model = tokenizer_vocabulary(_Tokenizer(), model_rows=800)
    assert smaller_model.size == 800
    assert smaller_model.special_ids == frozenset({0, 2, 7})
    assert tokenizer_vocabulary(_Tokenizer(), model_rows=6000).size == 1000
    assert tokenizer_vocabulary(_Tokenizer(), model_rows=None).size == 1000


def test_vocabulary_of_a_tokenizer_without_special_token_lists() -> None:
    class Bare:
        def __len__(self) -> int:
            return 10

    vocabulary = tokenizer_vocabulary(Bare(), model_rows=None)
    assert (vocabulary.size, vocabulary.special_ids) == (10, frozenset())


# -- peak memory ----------------------------------------------------------------------------------


def test_vm_hwm_is_read_from_a_status_file(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t  4321 kB\n")
    assert read_vm_hwm_kib(status) == 4321
    status.write_text("Name:\tpython\n")
    assert read_vm_hwm_kib(status) is None
    status.write_text("VmHWM:\tmany kB\n")
    assert read_vm_hwm_kib(status) is None
    assert read_vm_hwm_kib(tmp_path / "missing") is None


def test_peak_rss_reset_writes_five_or_says_it_could_not(tmp_path: Path) -> None:
    clear_refs = tmp_path / "clear_refs"
    assert reset_peak_rss(clear_refs)
    assert clear_refs.read_text() == "5"
    assert not reset_peak_rss(tmp_path / "missing" / "clear_refs")
    assert proc_file("status") == Path("/proc/self/status")
    assert proc_file("clear_refs", 42) == Path("/proc/42/clear_refs")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_this_process_peak_is_at_least_its_lifetime_view() -> None:
    now = read_vm_hwm_kib(proc_file("status"))
    lifetime = lifetime_peak_rss()
    assert now is not None
    assert lifetime.kind == "process_rss"
    assert lifetime.note == "process lifetime peak"
    assert lifetime.peak_mb is not None
    assert lifetime.peak_mb >= now / 1024 * 0.5


# -- the adapter base ------------------------------------------------------------------------------


def test_case_dtypes_are_the_case_models_choices() -> None:
    assert CASE_DTYPES[0] == "auto"
    for dtype in CASE_DTYPES:
        assert CaseConfig(dtype=dtype).dtype == dtype
    with pytest.raises(ValueError, match="dtype"):
        CaseConfig(dtype="float8")


def test_adapter_keeps_its_case_and_reports_progress(caplog: pytest.LogCaptureFixture) -> None:
    told: list[str] = []
    adapter = EngineAdapter(CaseConfig(model="m"), progress=told.append)
    with caplog.at_level(logging.INFO, logger="pytest_llem"):
        adapter._report("starting")
    assert told == ["starting"]
    assert "starting" in caplog.text
    assert adapter._config.model == "m"
    assert adapter._info is None


# -- progress -------------------------------------------------------------------------------------


def test_report_logs_and_tells_the_progress_callback(caplog: pytest.LogCaptureFixture) -> None:
    told: list[str] = []
    with caplog.at_level(logging.INFO, logger="pytest_llem"):
        report(told.append, "loading model")
        report(None, "no callback")
    assert told == ["loading model"]
    assert [r.getMessage() for r in caplog.records] == ["loading model", "no callback"]


# -- engine-scheduled backends --------------------------------------------------------------------


def test_gather_abandons_what_is_left_after_a_failure() -> None:
    done: Future[int] = Future()
    done.set_result(1)
    failed: Future[int] = Future()
    failed.set_exception(ValueError("request 2 failed"))
    pending: Future[int] = Future()
    abandoned: list[Sequence[Future[int]]] = []
    with pytest.raises(ValueError, match="request 2 failed"):
        gather([done, failed, pending], abandon=abandoned.append)
    assert abandoned == [[pending]]
    with pytest.raises(ValueError, match="request 2 failed"):
        gather([failed, pending])
    assert pending.cancelled(), "the default abandons by cancelling"
    assert gather([done, done]) == [1, 1]


class _PoolBackend(EngineScheduledBackend):
    """An engine-scheduled backend whose 'engine' is a thread pool; request 'fail' fails."""

    name = "pool"

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.release = threading.Event()
        self.abandoned: list[int] = []

    def _loaded(self) -> bool:
        return self.pool is not None

    def _start(
        self,
        requests: Sequence[Request],
        *,
        params: GenerateParams,
        on_token: TokenCallback | None,
    ) -> list[Future[Generation]]:
        assert self.pool is not None
        return [self.pool.submit(self._run, request, params) for request in requests]

    def _run(self, request: Request, params: GenerateParams) -> Generation:
        if request.prompt == "fail":
            raise BackendInferenceError(f"pool: request {request.index} failed")
        if request.prompt == "wait":
            self.release.wait(10)
        return Generation(
            request.index, 1, [7] * params.max_new_tokens, [0.0] * params.max_new_tokens, 0.0
        )

    def _abandon(self, futures: Sequence[Future[Generation]]) -> None:
        self.abandoned.append(len(futures))
        self.release.set()


def test_engine_scheduled_generate_and_submit() -> None:
    backend = _PoolBackend()
    params = GenerateParams(max_new_tokens=2)
    with pytest.raises(BackendInferenceError, match=r"pool: generate\(\) called before load"):
        backend.generate([], params=params)
    with pytest.raises(BackendInferenceError, match=r"pool: submit\(\) called before load"):
        backend.submit(Request(0, "a"), params=params)
    backend.pool = ThreadPoolExecutor(4)
    try:
        assert backend.generate([], params=params) == []
        out = backend.generate([Request(3, "a"), Request(5, "b")], params=params)
        assert [g.request_index for g in out] == [3, 5]
        assert backend.submit(Request(9, "c"), params=params).result(5).request_index == 9
        with pytest.raises(BackendInferenceError, match="request 1 failed"):
            backend.generate(
                [Request(0, "a"), Request(1, "fail"), Request(2, "wait")], params=params
            )
        assert backend.abandoned == [1], "the request still running was abandoned"
    finally:
        backend.release.set()
        backend.pool.shutdown(wait=True)


# -- the asyncio loop thread ----------------------------------------------------------------------


def test_event_loop_thread_runs_cancels_and_stops() -> None:
    loop = EventLoopThread(name="llem-test-loop")
    cancelled = threading.Event()

    async def answer() -> bool:
        await asyncio.sleep(0)
        return threading.current_thread().name == "llem-test-loop"

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        assert loop.submit(answer()).result(5) is True
        stuck = loop.submit(forever())
        loop.cancel_all(timeout_s=5)
        assert cancelled.is_set()
        assert stuck.cancelled()
    finally:
        loop.stop()
    assert loop.loop.is_closed()
    loop.stop()  # a second stop does nothing
    loop.cancel_all()


def _safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        size = 4
        for n in shape:
            size *= n
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))


def test_the_data_layer_imports_no_backend() -> None:
    """data/ builds requests for backends, so backends may import it but never the reverse."""
    imported: list[str] = []
    for path in Path(pytest_llem.data.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.append(f"{path.name}: {node.module}")
            elif isinstance(node, ast.Import):
                imported.extend(f"{path.name}: {alias.name}" for alias in node.names)
    assert imported, "the walk found the data modules' imports"
    assert [name for name in imported if "pytest_llem.backends" in name] == []
