"""Pydantic models for a benchmark case: the single source of truth for every parameter.

Each field carries its type, default, bounds and description, and in ``json_schema_extra``:
whether changing it needs a new model load (``load``), the values a sweep takes for ``"auto"``
(``sweep``, else they are derived from the type and bounds), and its short name in test ids
(``id``). Rules between fields are declared once, in :data:`CONSTRAINTS`; the model's validator
and the sweep's pruning both read them. Introspection (``config.introspection``) reads all of
this; nothing keeps a parallel list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "BUILTIN_BACKENDS",
    "CONSTRAINTS",
    "SAMPLING_PRESETS",
    "CaseConfig",
    "Constraint",
    "EndpointConfig",
    "SamplingConfig",
    "SloConfig",
    "TensorRTConfig",
    "TrafficConfig",
    "TransformersConfig",
    "VllmConfig",
    "load_fields",
]

#: Backends shipped with the plugin. A conftest can add more through the plugin's hooks.
BUILTIN_BACKENDS: tuple[str, ...] = ("transformers", "endpoint", "tensorrt", "vllm")


def _meta(
    *, load: bool = False, sweep: list[Any] | None = None, short: str | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if load:
        meta["load"] = True
    if sweep is not None:
        meta["sweep"] = sweep
    if short is not None:
        meta["id"] = short
    return meta


_LOAD = _meta(load=True)

#: Named sampling settings; a preset fills the sampling fields the user did not set.
SAMPLING_PRESETS: dict[str, dict[str, Any]] = {
    "deterministic": {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
    "standard": {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
    "creative": {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "top_k": 50},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class SamplingConfig(_Strict):
    """How output tokens are chosen. Greedy decoding (``deterministic``) unless told otherwise."""

    preset: Literal["deterministic", "standard", "creative", "custom"] = Field(
        default="deterministic",
        description="Named sampling settings; explicit fields override the preset's values.",
        json_schema_extra=_meta(sweep=["deterministic", "standard", "creative"], short="sampling"),
    )
    do_sample: bool = Field(
        default=False,
        description="Sample from the distribution instead of greedy.",
        json_schema_extra=_meta(short="sample"),
    )
    temperature: float = Field(
        default=1.0,
        ge=0.0,
        le=10.0,
        description="Softmax temperature (only with do_sample).",
        json_schema_extra=_meta(sweep=[0.5, 1.0, 1.5], short="t"),
    )
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling mass (1 disables).",
        json_schema_extra=_meta(sweep=[0.5, 0.9, 1.0], short="top_p"),
    )
    top_k: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="Top-k sampling cut-off (0 disables).",
        json_schema_extra=_meta(sweep=[0, 10, 50], short="top_k"),
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict):
            return data
        data = dict(data)
        preset = data.get("preset")
        knobs = [k for k in ("temperature", "top_p", "top_k") if k in data]
        if preset is None:
            if knobs and "do_sample" not in data:
                # Naming a temperature (other than 0, greedy by convention) asks for sampling.
                data["do_sample"] = data.get("temperature", 1.0) != 0
            preset = "custom" if data.get("do_sample") else "deterministic"
        base = SAMPLING_PRESETS.get(preset, SAMPLING_PRESETS["deterministic"])
        return {**base, **data, "preset": preset}

    @model_validator(mode="after")
    def _check_sampling(self) -> SamplingConfig:
        if self.do_sample and self.temperature == 0.0:
            raise ValueError("temperature=0 with do_sample=true is undefined; use do_sample=false")
        if not self.do_sample and (
            self.temperature not in (0.0, 1.0) or self.top_p != 1.0 or self.top_k != 0
        ):
            raise ValueError(
                "temperature, top_p and top_k only apply with do_sample=true "
                "(or a sampling preset such as 'standard')"
            )
        return self


class TransformersConfig(_Strict):
    """Settings of the Hugging Face transformers backend (``transformers.*``)."""

    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        default="auto",
        description="Attention kernel passed to from_pretrained ('auto' lets transformers pick).",
        json_schema_extra=_meta(load=True, sweep=["eager", "sdpa", "flash_attention_2"]),
    )
    torch_compile: bool = Field(
        default=False,
        description="Wrap the model with torch.compile after loading.",
        json_schema_extra=_meta(load=True, short="compile"),
    )
    cache_implementation: Literal["auto", "dynamic", "static"] = Field(
        default="auto",
        description="KV-cache implementation for generate ('auto': the model's default).",
        json_schema_extra=_meta(sweep=["dynamic", "static"], short="cache"),
    )
    low_cpu_mem_usage: bool = Field(
        default=True,
        description="Load weights without a full extra copy in CPU memory.",
        json_schema_extra=_meta(load=True, short="lowmem"),
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow model repositories to run their own code.",
        json_schema_extra=_meta(load=True, short="remote"),
    )
    quantization: Literal["none", "bnb-8bit", "bnb-4bit"] = Field(
        default="none",
        description="Quantize the weights at load time with bitsandbytes (LLM.int8() or 4-bit); "
        "needs the bitsandbytes package and a device it supports.",
        json_schema_extra=_meta(load=True, short="quant"),
    )
    bnb_4bit_compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Compute dtype of bnb-4bit layers ('auto': the case's dtype).",
        json_schema_extra=_meta(load=True, short="bnb_cdt"),
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4",
        description="4-bit data type of bnb-4bit weights: NormalFloat4 or plain FP4.",
        json_schema_extra=_meta(load=True, short="bnb_qt"),
    )
    bnb_4bit_use_double_quant: bool = Field(
        default=False,
        description="Also quantize the bnb-4bit quantization constants (nested quantization).",
        json_schema_extra=_meta(load=True, short="bnb_dq"),
    )


def _endpoint_url(value: str | None) -> str | None:
    """An http(s) URL with a host, without a trailing slash."""
    if value is None:
        return None
    text = value.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the URL must not carry a query or fragment, got {value!r}")
    if parts.username is not None or parts.password is not None:
        # The URL is recorded; credentials belong in the variable named by api_key_env.
        raise ValueError("the URL must not carry credentials; use endpoint.api_key_env")
    return text


class EndpointConfig(_Strict):
    """Settings of the endpoint backend (``endpoint.*``): an OpenAI-compatible server that runs
    on the measured machine (vLLM, trtllm-serve, SGLang, TGI, llama.cpp)."""

    url: Annotated[str | None, AfterValidator(_endpoint_url)] = Field(
        default=None,
        description="Base URL of the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is "
        "accepted); set by --llem-endpoint.",
        json_schema_extra=_meta(load=True, short="url"),
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the API key sent as a bearer token (the key "
        "itself is never recorded); unset or empty: no key is sent.",
        json_schema_extra=_meta(load=True, short="key_env"),
    )
    served_model: str | None = Field(
        default=None,
        min_length=1,
        description="Model name the server knows the model by (default: the case's model).",
        json_schema_extra=_meta(load=True, short="served"),
    )
    timeout_s: float = Field(
        default=600.0,
        gt=0.0,
        le=86_400.0,
        description="Most seconds to wait for the server's next bytes (the response head or the "
        "next streamed chunk).",
        json_schema_extra=_meta(load=True, sweep=[60.0, 600.0], short="timeout"),
    )
    connect_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=3600.0,
        description="Most seconds to wait for a connection to the server.",
        json_schema_extra=_meta(load=True, sweep=[1.0, 10.0], short="ctimeout"),
    )
    max_concurrency: int = Field(
        default=256,
        ge=1,
        le=4096,
        description="Most requests this client keeps open at once (one connection each).",
        json_schema_extra=_meta(load=True, sweep=[1, 8, 64, 256], short="ep_conc"),
    )
    token_source: Literal["auto", "return_token_ids", "logprobs", "usage", "chunks"] = Field(
        default="auto",
        description="How output tokens are counted: token ids the server streams "
        "(return_token_ids), logprobs entries, the server's usage count, or stream chunks "
        "('auto': the first of return_token_ids, usage, chunks the server supports).",
        json_schema_extra=_meta(load=True, short="tokens"),
    )


class TensorRTConfig(_Strict):
    """Settings of the TensorRT-LLM backend (``tensorrt.*``); each needs a new engine.

    The model's dtype and device are the case's own ``dtype`` and ``device``; unset limits take
    TensorRT-LLM's defaults.
    """

    backend: Literal["pytorch", "trt"] = Field(
        default="pytorch",
        description="TensorRT-LLM runtime: 'pytorch' (tensorrt_llm.LLM, the default since 1.0) "
        "or 'trt' (a compiled TensorRT engine, built before the first run).",
        json_schema_extra=_meta(load=True, sweep=["pytorch", "trt"], short="trt"),
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=65_536,
        description="Most requests the engine's scheduler runs together.",
        json_schema_extra=_meta(load=True, sweep=[8, 64, 256], short="trt_mbs"),
    )
    max_num_tokens: int | None = Field(
        default=None,
        ge=1,
        le=16_777_216,
        description="Most tokens (prompt and generated) the engine processes in one step.",
        json_schema_extra=_meta(load=True, sweep=[2048, 8192, 16384], short="trt_mnt"),
    )
    max_seq_len: int | None = Field(
        default=None,
        ge=1,
        le=16_777_216,
        description="Most tokens of one request, prompt and output together.",
        json_schema_extra=_meta(load=True, sweep=[1024, 4096, 16384], short="trt_msl"),
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs each layer is split over (tensor parallelism).",
        json_schema_extra=_meta(load=True, sweep=[1, 2, 4, 8], short="trt_tp"),
    )
    pipeline_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs the layers are spread over in stages (pipeline parallelism).",
        json_schema_extra=_meta(load=True, sweep=[1, 2, 4], short="trt_pp"),
    )
    quantization: Literal[
        "none", "fp8", "w8a16", "w4a16", "w4a16_awq", "w4a8_awq", "w8a8_sq", "nvfp4"
    ] = Field(
        default="none",
        description="Quantize while building the engine (backend=trt only; QuantAlgo FP8, "
        "W8A16, W4A16, W4A16_AWQ, W4A8_AWQ, W8A8_SQ_PER_CHANNEL, NVFP4). fp8, AWQ and SmoothQuant "
        "calibrate on a dataset; the pytorch runtime reads a pre-quantized checkpoint instead.",
        json_schema_extra=_meta(
            load=True, sweep=["none", "fp8", "w8a16", "w4a16_awq"], short="trt_q"
        ),
    )
    kv_cache_free_gpu_memory_fraction: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Share of the GPU memory left free after loading that the KV cache takes "
        "(KvCacheConfig.free_gpu_memory_fraction; TensorRT-LLM's default is 0.9).",
        json_schema_extra=_meta(load=True, sweep=[0.5, 0.7, 0.9], short="trt_kv"),
    )
    engine_cache_dir: str | None = Field(
        default=None,
        min_length=1,
        description="Folder where built TensorRT engines are kept and reused by later runs "
        "(TensorRT-LLM's build cache; backend=trt only), in its subfolder "
        "pytest-llem-trt-engines, which must hold nothing else: TensorRT-LLM keeps only the "
        "newest 10 engines there and deletes any other entry. Unset: every load builds anew.",
        json_schema_extra=_meta(load=True, short="trt_cache"),
    )


class VllmConfig(_Strict):
    """Settings of the vLLM backend (``vllm.*``); each needs a new engine.

    The model's dtype and device are the case's own ``dtype`` and ``device``; unset (none)
    settings take vLLM's own defaults. On CPU the KV cache is sized by the environment variable
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB; pytest-llem sets 1 unless it is set already).
    """

    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Share of the GPU's memory vLLM reserves for weights, activations and KV "
        "cache (none: vLLM's default). On CPU, VLLM_CPU_KVCACHE_SPACE sizes the KV cache instead.",
        json_schema_extra=_meta(load=True, sweep=[0.5, 0.7, 0.9], short="gmu"),
    )
    max_num_seqs: int | None = Field(
        default=None,
        ge=1,
        le=65_536,
        description="Most requests vLLM's scheduler runs together in one step.",
        json_schema_extra=_meta(load=True, sweep=[8, 64, 256], short="seqs"),
    )
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=1,
        le=16_777_216,
        description="Most tokens (prompt and generated) vLLM's scheduler puts in one step.",
        json_schema_extra=_meta(load=True, sweep=[2048, 8192, 16384], short="mbt"),
    )
    max_model_len: int | None = Field(
        default=None,
        ge=2,
        le=16_777_216,
        description="Most tokens of one request, prompt and output together (none: the model's "
        "own limit). A request that would not fit is an error, never silently cut short.",
        json_schema_extra=_meta(load=True, sweep=[512, 2048, 8192], short="mml"),
    )
    enforce_eager: bool = Field(
        default=False,
        description="Run the model eagerly: no CUDA graphs and no torch.compile (faster start, "
        "usually slower steps).",
        json_schema_extra=_meta(load=True, short="eager"),
    )
    enable_prefix_caching: bool = Field(
        default=False,
        description="Reuse the KV cache of shared prompt prefixes. Off by default (vLLM's own "
        "default is on) so repetitions of the same prompts do not hit a cache their warmup "
        "filled; turn it on to measure a workload that really shares prefixes.",
        json_schema_extra=_meta(load=True, short="prefix"),
    )
    enable_chunked_prefill: bool | None = Field(
        default=None,
        description="Split long prompts into chunks scheduled alongside decoding steps "
        "(none: vLLM's default).",
        json_schema_extra=_meta(load=True, sweep=[False, True], short="chunked"),
    )
    kv_cache_dtype: Literal["auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        default="auto",
        description="Data type of the KV cache ('auto': the model's dtype).",
        json_schema_extra=_meta(load=True, sweep=["auto", "fp8"], short="kv"),
    )
    quantization: str | None = Field(
        default=None,
        min_length=1,
        description="Weight quantization method vLLM applies or reads (fp8, awq, gptq, "
        "bitsandbytes, ...; none: from the checkpoint's own quantization config, if any).",
        json_schema_extra=_meta(load=True, sweep=["fp8"], short="vllm_q"),
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Devices each layer is split over (tensor parallelism).",
        json_schema_extra=_meta(load=True, sweep=[1, 2, 4, 8], short="vllm_tp"),
    )
    pipeline_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Devices the layers are spread over in stages (pipeline parallelism).",
        json_schema_extra=_meta(load=True, sweep=[1, 2, 4], short="vllm_pp"),
    )
    swap_space: float | None = Field(
        default=None,
        ge=0.0,
        le=1024.0,
        description="CPU swap space per GPU in GiB for preempted requests (none: vLLM's default). "
        "Only vLLM versions that still take it: the V1 engine (vLLM 0.11 and later) has no swap "
        "space, and a value there is refused.",
        json_schema_extra=_meta(load=True, sweep=[0.0, 4.0, 16.0], short="swap"),
    )


class TrafficConfig(_Strict):
    """Arrivals of the ``server`` scenario (``traffic.*``): an open loop on a seeded schedule."""

    arrival: Literal["poisson", "constant", "gamma"] = Field(
        default="poisson",
        description="Inter-arrival distribution: poisson (exponential gaps), constant, gamma.",
        json_schema_extra=_meta(short="arrival"),
    )
    rate: float = Field(
        default=4.0,
        gt=0.0,
        le=100_000.0,
        description="Target arrival rate in requests per second.",
        json_schema_extra=_meta(sweep=[1.0, 4.0, 16.0], short="rate"),
    )
    burstiness: float = Field(
        default=1.0,
        gt=0.0,
        le=1000.0,
        description="Gamma shape of the inter-arrival gaps (1 is Poisson; below 1 is burstier).",
        json_schema_extra=_meta(sweep=[0.5, 1.0, 2.0], short="burst"),
    )
    num_requests: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Requests per repetition (default: num_prompts, unless duration_s is set).",
        json_schema_extra=_meta(sweep=[16, 64, 256], short="reqs"),
    )
    duration_s: float | None = Field(
        default=None,
        gt=0.0,
        le=86_400.0,
        description="Arrivals are scheduled over this many seconds instead of a request count.",
        json_schema_extra=_meta(sweep=[10.0, 60.0], short="dur"),
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Most requests in flight at once (arrived and not finished); none: no limit.",
        json_schema_extra=_meta(sweep=[1, 8, 64], short="conc"),
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Seed of the arrival schedule.",
        json_schema_extra=_meta(sweep=[0, 1, 2], short="tseed"),
    )
    steady_state: bool = Field(
        default=False,
        description="Also report the steady state alone: from the issue of the request at "
        "ramp_up_fraction of the schedule to the issue of the last request.",
        json_schema_extra=_meta(short="steady"),
    )
    ramp_up_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Share of the scheduled requests that make up the ramp-up.",
        json_schema_extra=_meta(sweep=[0.0, 0.1, 0.25], short="ramp"),
    )


class SloConfig(_Strict):
    """Service-level bounds (``slo.*``); a request is good when it meets every bound set."""

    ttft_ms: float | None = Field(
        default=None,
        gt=0.0,
        description="Most time to first token, in ms.",
        json_schema_extra=_meta(sweep=[200.0, 1000.0, 5000.0], short="slo_ttft"),
    )
    tpot_ms: float | None = Field(
        default=None,
        gt=0.0,
        description="Most time per output token after the first, in ms.",
        json_schema_extra=_meta(sweep=[20.0, 50.0, 200.0], short="slo_tpot"),
    )
    e2e_ms: float | None = Field(
        default=None,
        gt=0.0,
        description="Most end-to-end latency, in ms.",
        json_schema_extra=_meta(sweep=[1000.0, 10000.0, 60000.0], short="slo_e2e"),
    )


class CaseConfig(_Strict):
    """Everything that defines one benchmark case.

    Precedence when a case is resolved, highest first: command line (its sweep included) >
    ini/pyproject (its sweep included) > ``llem.run`` overrides > the ``llem_sweep`` marker >
    ``llem`` markers > these defaults.
    Sampling fields may also be given at the top level (``temperature=0.7``); they are moved into
    ``sampling``.
    """

    model: str = Field(
        default="llem-tiny",
        min_length=1,
        description="'llem-tiny' (built-in), a local model folder, or a Hugging Face hub id.",
        json_schema_extra=_LOAD,
    )
    backend: str = Field(
        default="transformers",
        description="Inference engine that runs the model.",
        json_schema_extra=_LOAD,
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where the model runs ('auto': cuda when visible, else cpu).",
        json_schema_extra=_meta(load=True, sweep=["cpu", "cuda"]),
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Weight and activation dtype ('auto': bfloat16 on cuda, float32 on cpu).",
        json_schema_extra=_meta(load=True, sweep=["float32", "float16", "bfloat16"]),
    )
    batch_size: int = Field(
        default=1,
        ge=1,
        le=4096,
        description="Requests per generate call (offline).",
        json_schema_extra=_meta(sweep=[1, 4, 16, 64], short="bs"),
    )
    max_input_tokens: int = Field(
        default=512,
        ge=1,
        le=1_048_576,
        description="Prompts are truncated to this many tokens.",
        json_schema_extra=_meta(sweep=[128, 512, 2048], short="in"),
    )
    max_new_tokens: int = Field(
        default=32,
        ge=1,
        le=1_048_576,
        description="Most output tokens generated per request.",
        json_schema_extra=_meta(sweep=[16, 64, 256], short="out"),
    )
    min_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1_048_576,
        description="Fewest output tokens per request; equal to max_new_tokens fixes the length.",
        json_schema_extra=_meta(sweep=[1, 16, 64], short="min"),
    )
    num_prompts: int = Field(
        default=16,
        ge=1,
        le=1_000_000,
        description="Requests per repetition.",
        json_schema_extra=_meta(sweep=[16, 64, 256], short="n"),
    )
    prompts: str = Field(
        default="default",
        min_length=1,
        description='A built-in prompt set name, a .jsonl file of {"prompt": ...} lines, a '
        "ShareGPT-style .json file, 'synthetic' (see input_tokens), or 'hf:ORG/NAME' (or "
        "'hf:PATH' of a dataset saved to disk).",
    )
    input_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1_048_576,
        description="Exact prompt length in tokens for prompts='synthetic'.",
        json_schema_extra=_meta(sweep=[128, 512, 2048], short="isl"),
    )
    prompt_split: str = Field(
        default="train",
        min_length=1,
        description="Dataset split for prompts='hf:ORG/NAME' (or a dataset saved to disk).",
    )
    prompt_column: str | None = Field(
        default=None,
        min_length=1,
        description="Dataset column holding the prompt (default: the first of prompt, text, "
        "question, instruction, conversations).",
    )
    prompt_overflow: Literal["truncate", "filter"] = Field(
        default="truncate",
        description="Prompts longer than max_input_tokens are truncated, or filtered out.",
        json_schema_extra=_meta(short="overflow"),
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,  # type: ignore[arg-type]
        description="Decoding settings (a preset name or the fields).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Seed for sampling and prompt order.",
        json_schema_extra=_meta(sweep=[0, 1, 2], short="seed"),
    )
    warmup: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Unmeasured repetitions before measuring.",
        json_schema_extra=_meta(sweep=[0, 1, 3], short="warmup"),
    )
    repeat: int = Field(
        default=3,
        ge=1,
        le=10_000,
        description="Measured repetitions (one window each).",
        json_schema_extra=_meta(sweep=[3, 5, 10], short="rep"),
    )
    scenario: Literal["offline", "single_stream", "server"] = Field(
        default="offline",
        description="How requests are issued: offline (all at once, in batches of batch_size), "
        "single_stream (one at a time), server (arrivals on a schedule, see traffic).",
        json_schema_extra=_meta(sweep=["offline", "single_stream", "server"]),
    )
    traffic: TrafficConfig = Field(
        default_factory=TrafficConfig,  # type: ignore[arg-type]
        description="Arrival schedule of the server scenario.",
    )
    slo: SloConfig = Field(
        default_factory=SloConfig,  # type: ignore[arg-type]
        description="Service-level bounds for goodput and energy per good request.",
    )
    transformers: TransformersConfig = Field(
        default_factory=TransformersConfig,  # type: ignore[arg-type]
        description="Settings of the transformers backend.",
    )
    endpoint: EndpointConfig = Field(
        default_factory=EndpointConfig,  # type: ignore[arg-type]
        description="Settings of the endpoint backend (an OpenAI-compatible server).",
    )
    tensorrt: TensorRTConfig = Field(
        default_factory=TensorRTConfig,  # type: ignore[arg-type]
        description="Settings of the TensorRT-LLM backend.",
    )
    vllm: VllmConfig = Field(
        default_factory=VllmConfig,  # type: ignore[arg-type]
        description="Settings of the vLLM backend.",
    )

    @model_validator(mode="before")
    @classmethod
    def _lift_sampling(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in ("do_sample", "temperature", "top_p", "top_k") if k in data}
        if not flat:
            return data
        rest = {k: v for k, v in data.items() if k not in flat}
        sampling = rest.get("sampling", {})
        if isinstance(sampling, str):
            sampling = {"preset": sampling}
        elif isinstance(sampling, BaseModel):
            sampling = sampling.model_dump(exclude_unset=True)
        rest["sampling"] = {**dict(sampling), **flat}
        return rest

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str, info: ValidationInfo) -> str:
        known = (info.context or {}).get("backends", BUILTIN_BACKENDS)
        if value not in known:
            raise ValueError(f"unknown backend {value!r}; choose from: {', '.join(known)}")
        return value

    @field_validator("prompts")
    @classmethod
    def _prompt_source(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _check_constraints(self) -> CaseConfig:
        for constraint in CONSTRAINTS:
            if constraint.needs == "valid" and not constraint.check(self):
                raise ValueError(constraint.explain(self))
        return self


@dataclass(frozen=True)
class Constraint:
    """A rule between parameters, declared once.

    ``needs="valid"``: a case breaking it is invalid (the model rejects it; a sweep skips that
    combination with the rule as reason). ``needs="gpu"``: the case can only run where a GPU is
    visible (a sweep skips it on a machine without one).
    """

    name: str
    parameters: tuple[str, ...]
    rule: str
    check: Callable[[CaseConfig], bool]
    needs: Literal["valid", "gpu"] = "valid"

    def explain(self, case: CaseConfig) -> str:
        """The rule with the values this case gave its parameters."""
        values = ", ".join(f"{path}={_value_at(case, path)!r}" for path in self.parameters)
        return f"{self.rule} ({values})"


def _value_at(case: BaseModel, path: str) -> Any:
    node: Any = case
    for part in path.split("."):
        node = getattr(node, part)
    return node


#: Every rule between parameters. The model enforces the ``valid`` ones; sweeps read all.
CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint(
        "min-within-max",
        ("min_new_tokens", "max_new_tokens"),
        "min_new_tokens must not exceed max_new_tokens",
        lambda c: c.min_new_tokens is None or c.min_new_tokens <= c.max_new_tokens,
    ),
    Constraint(
        "no-float16-on-cpu",
        ("dtype", "device"),
        "dtype=float16 is not supported on device=cpu (use bfloat16 or float32)",
        lambda c: not (c.device == "cpu" and c.dtype == "float16"),
    ),
    Constraint(
        "flash-attention-needs-cuda",
        ("transformers.attn_implementation", "device"),
        "transformers.attn_implementation=flash_attention_2 needs device=cuda",
        lambda c: c.transformers.attn_implementation != "flash_attention_2" or c.device != "cpu",
    ),
    Constraint(
        "bnb-4bit-options-need-bnb-4bit",
        (
            "transformers.quantization",
            "transformers.bnb_4bit_compute_dtype",
            "transformers.bnb_4bit_quant_type",
            "transformers.bnb_4bit_use_double_quant",
        ),
        "transformers.bnb_4bit_* settings apply only with transformers.quantization=bnb-4bit",
        lambda c: (
            c.transformers.quantization == "bnb-4bit"
            or (
                c.transformers.bnb_4bit_compute_dtype == "auto"
                and c.transformers.bnb_4bit_quant_type == "nf4"
                and not c.transformers.bnb_4bit_use_double_quant
            )
        ),
    ),
    Constraint(
        "tensorrt-runs-on-cuda",
        ("backend", "device"),
        "backend=tensorrt runs only on NVIDIA GPUs, so device=cpu is not supported",
        lambda c: c.backend != "tensorrt" or c.device != "cpu",
    ),
    Constraint(
        "tensorrt-quantization-needs-trt-runtime",
        ("tensorrt.quantization", "tensorrt.backend"),
        "tensorrt.quantization quantizes while building an engine, so it needs "
        "tensorrt.backend=trt (the pytorch runtime reads a pre-quantized checkpoint)",
        lambda c: c.tensorrt.quantization == "none" or c.tensorrt.backend == "trt",
    ),
    Constraint(
        "tensorrt-engine-cache-needs-trt-runtime",
        ("tensorrt.engine_cache_dir", "tensorrt.backend"),
        "tensorrt.engine_cache_dir keeps built TensorRT engines, so it needs tensorrt.backend=trt",
        lambda c: c.tensorrt.engine_cache_dir is None or c.tensorrt.backend == "trt",
    ),
    Constraint(
        "vllm-model-len-holds-the-output",
        ("vllm.max_model_len", "max_new_tokens"),
        "vllm.max_model_len must exceed max_new_tokens (it counts the prompt and the output)",
        lambda c: c.vllm.max_model_len is None or c.max_new_tokens < c.vllm.max_model_len,
    ),
    Constraint(
        "single-stream-is-one-at-a-time",
        ("scenario", "batch_size"),
        "scenario=single_stream issues one request at a time, so batch_size must be 1",
        lambda c: c.scenario != "single_stream" or c.batch_size == 1,
    ),
    Constraint(
        "poisson-has-burstiness-1",
        ("traffic.arrival", "traffic.burstiness"),
        "traffic.arrival=poisson has burstiness 1 (use arrival=gamma for other shapes)",
        lambda c: c.traffic.arrival != "poisson" or c.traffic.burstiness == 1.0,
    ),
    Constraint(
        "requests-or-duration",
        ("traffic.num_requests", "traffic.duration_s"),
        "set traffic.num_requests or traffic.duration_s, not both",
        lambda c: c.traffic.num_requests is None or c.traffic.duration_s is None,
    ),
    Constraint(
        "synthetic-needs-input-tokens",
        ("prompts", "input_tokens"),
        "input_tokens is set exactly when prompts='synthetic'",
        lambda c: (c.prompts == "synthetic") == (c.input_tokens is not None),
    ),
    Constraint(
        "cuda-needs-gpu",
        ("device",),
        "device=cuda needs a visible GPU",
        lambda c: c.device != "cuda",
        needs="gpu",
    ),
    Constraint(
        "float16-needs-gpu",
        ("dtype",),
        "dtype=float16 runs only on a GPU",
        lambda c: c.dtype != "float16",
        needs="gpu",
    ),
    Constraint(
        "tensorrt-needs-gpu",
        ("backend",),
        "backend=tensorrt runs only on an NVIDIA GPU",
        lambda c: c.backend != "tensorrt",
        needs="gpu",
    ),
    Constraint(
        "flash-attention-needs-gpu",
        ("transformers.attn_implementation",),
        "transformers.attn_implementation=flash_attention_2 runs only on a GPU",
        lambda c: c.transformers.attn_implementation != "flash_attention_2",
        needs="gpu",
    ),
)


def load_fields(model: type[BaseModel] = CaseConfig, prefix: str = "") -> list[str]:
    """Return the dotted paths of every field whose change requires a new model load."""
    paths: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.extend(load_fields(annotation, f"{prefix}{name}."))
            continue
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("load"):
            paths.append(f"{prefix}{name}")
    return paths
