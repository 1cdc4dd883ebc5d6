"""Settings of each built-in engine: ``transformers.*``, ``endpoint.*``, ``tensorrt.*``,
``vllm.*``. Most of them need a new model load when they change."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from pytest_llem.config.fields import StrictModel, field_meta

__all__ = ["EndpointConfig", "TensorRTConfig", "TransformersConfig", "VllmConfig"]


class TransformersConfig(StrictModel):
    """Settings of the Hugging Face transformers backend (``transformers.*``)."""

    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        default="auto",
        description="Attention kernel passed to from_pretrained ('auto' lets transformers pick).",
        json_schema_extra=field_meta(load=True, sweep=["eager", "sdpa", "flash_attention_2"]),
    )
    torch_compile: bool = Field(
        default=False,
        description="Wrap the model with torch.compile after loading.",
        json_schema_extra=field_meta(load=True, short="compile"),
    )
    cache_implementation: Literal["auto", "dynamic", "static"] = Field(
        default="auto",
        description="KV-cache implementation for generate ('auto': the model's default).",
        json_schema_extra=field_meta(sweep=["dynamic", "static"], short="cache"),
    )
    low_cpu_mem_usage: bool = Field(
        default=True,
        description="Load weights without a full extra copy in CPU memory.",
        json_schema_extra=field_meta(load=True, short="lowmem"),
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow model repositories to run their own code.",
        json_schema_extra=field_meta(load=True, short="remote"),
    )
    quantization: Literal["none", "bnb-8bit", "bnb-4bit"] = Field(
        default="none",
        description="Quantize the weights at load time with bitsandbytes (LLM.int8() or 4-bit); "
        "needs the bitsandbytes package and a device it supports.",
        json_schema_extra=field_meta(load=True, short="quant"),
    )
    bnb_4bit_compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Compute dtype of bnb-4bit layers ('auto': the case's dtype).",
        json_schema_extra=field_meta(load=True, short="bnb_cdt"),
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4",
        description="4-bit data type of bnb-4bit weights: NormalFloat4 or plain FP4.",
        json_schema_extra=field_meta(load=True, short="bnb_qt"),
    )
    bnb_4bit_use_double_quant: bool = Field(
        default=False,
        description="Also quantize the bnb-4bit quantization constants (nested quantization).",
        json_schema_extra=field_meta(load=True, short="bnb_dq"),
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


class EndpointConfig(StrictModel):
    """Settings of the endpoint backend (``endpoint.*``): an OpenAI-compatible server that runs
    on the measured machine (vLLM, trtllm-serve, SGLang, TGI, llama.cpp)."""

    url: Annotated[str | None, AfterValidator(_endpoint_url)] = Field(
        default=None,
        description="Base URL of the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is "
        "accepted); set by --llem-endpoint.",
        json_schema_extra=field_meta(load=True, short="url"),
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the API key sent as a bearer token (the key "
        "itself is never recorded); unset or empty: no key is sent.",
        json_schema_extra=field_meta(load=True, short="key_env"),
    )
    served_model: str | None = Field(
        default=None,
        min_length=1,
        description="Model name the server knows the model by (default: the case's model).",
        json_schema_extra=field_meta(load=True, short="served"),
    )
    timeout_s: float = Field(
        default=600.0,
        gt=0.0,
        le=86_400.0,
        description="Most seconds to wait for the server's next bytes (the response head or the "
        "next streamed chunk).",
        json_schema_extra=field_meta(load=True, sweep=[60.0, 600.0], short="timeout"),
    )
    connect_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=3600.0,
        description="Most seconds to wait for a connection to the server.",
        json_schema_extra=field_meta(load=True, sweep=[1.0, 10.0], short="ctimeout"),
    )
    max_concurrency: int = Field(
        default=256,
        ge=1,
        le=4096,
        description="Most requests this client keeps open at once (one connection each).",
        json_schema_extra=field_meta(load=True, sweep=[1, 8, 64, 256], short="ep_conc"),
    )
    token_source: Literal["auto", "return_token_ids", "logprobs", "usage", "chunks"] = Field(
        default="auto",
        description="How output tokens are counted: token ids the server streams "
        "(return_token_ids), logprobs entries, the server's usage count, or stream chunks "
        "('auto': the first of return_token_ids, usage, chunks the server supports).",
        json_schema_extra=field_meta(load=True, short="tokens"),
    )


class TensorRTConfig(StrictModel):
    """Settings of the TensorRT-LLM backend (``tensorrt.*``); each needs a new engine.

    The model's dtype and device are the case's own ``dtype`` and ``device``; unset limits take
    TensorRT-LLM's defaults.
    """

    backend: Literal["pytorch", "trt"] = Field(
        default="pytorch",
        description="TensorRT-LLM runtime: 'pytorch' (tensorrt_llm.LLM, the default since 1.0) "
        "or 'trt' (a compiled TensorRT engine, built before the first run).",
        json_schema_extra=field_meta(load=True, sweep=["pytorch", "trt"], short="trt"),
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=65_536,
        description="Most requests the engine's scheduler runs together.",
        json_schema_extra=field_meta(load=True, sweep=[8, 64, 256], short="trt_mbs"),
    )
    max_num_tokens: int | None = Field(
        default=None,
        ge=1,
        le=16_777_216,
        description="Most tokens (prompt and generated) the engine processes in one step.",
        json_schema_extra=field_meta(load=True, sweep=[2048, 8192, 16384], short="trt_mnt"),
    )
    max_seq_len: int | None = Field(
        default=None,
        ge=1,
        le=16_777_216,
        description="Most tokens of one request, prompt and output together.",
        json_schema_extra=field_meta(load=True, sweep=[1024, 4096, 16384], short="trt_msl"),
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs each layer is split over (tensor parallelism).",
        json_schema_extra=field_meta(load=True, sweep=[1, 2, 4, 8], short="trt_tp"),
    )
    pipeline_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs the layers are spread over in stages (pipeline parallelism).",
        json_schema_extra=field_meta(load=True, sweep=[1, 2, 4], short="trt_pp"),
    )
    quantization: Literal[
        "none", "fp8", "w8a16", "w4a16", "w4a16_awq", "w4a8_awq", "w8a8_sq", "nvfp4"
    ] = Field(
        default="none",
        description="Quantize while building the engine (backend=trt only; QuantAlgo FP8, "
        "W8A16, W4A16, W4A16_AWQ, W4A8_AWQ, W8A8_SQ_PER_CHANNEL, NVFP4). fp8, AWQ and SmoothQuant "
        "calibrate on a dataset; the pytorch runtime reads a pre-quantized checkpoint instead.",
        json_schema_extra=field_meta(
            load=True, sweep=["none", "fp8", "w8a16", "w4a16_awq"], short="trt_q"
        ),
    )
    kv_cache_free_gpu_memory_fraction: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Share of the GPU memory left free after loading that the KV cache takes "
        "(KvCacheConfig.free_gpu_memory_fraction; TensorRT-LLM's default is 0.9).",
        json_schema_extra=field_meta(load=True, sweep=[0.5, 0.7, 0.9], short="trt_kv"),
    )
    engine_cache_dir: str | None = Field(
        default=None,
        min_length=1,
        description="Folder where built TensorRT engines are kept and reused by later runs "
        "(TensorRT-LLM's build cache; backend=trt only), in its subfolder "
        "pytest-llem-trt-engines, which must hold nothing else: TensorRT-LLM keeps only the "
        "newest 10 engines there and deletes any other entry. Unset: every load builds anew.",
        json_schema_extra=field_meta(load=True, short="trt_cache"),
    )


class VllmConfig(StrictModel):
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
        json_schema_extra=field_meta(load=True, sweep=[0.5, 0.7, 0.9], short="gmu"),
    )
    max_num_seqs: int | None = Field(
        default=None,
        ge=1,
        le=65_536,
        description="Most requests vLLM's scheduler runs together in one step.",
        json_schema_extra=field_meta(load=True, sweep=[8, 64, 256], short="seqs"),
    )
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=1,
        le=16_777_216,
        description="Most tokens (prompt and generated) vLLM's scheduler puts in one step.",
        json_schema_extra=field_meta(load=True, sweep=[2048, 8192, 16384], short="mbt"),
    )
    max_model_len: int | None = Field(
        default=None,
        ge=2,
        le=16_777_216,
        description="Most tokens of one request, prompt and output together (none: the model's "
        "own limit). A request that would not fit is an error, never silently cut short.",
        json_schema_extra=field_meta(load=True, sweep=[512, 2048, 8192], short="mml"),
    )
    enforce_eager: bool = Field(
        default=False,
        description="Run the model eagerly: no CUDA graphs and no torch.compile (faster start, "
        "usually slower steps).",
        json_schema_extra=field_meta(load=True, short="eager"),
    )
    enable_prefix_caching: bool = Field(
        default=False,
        description="Reuse the KV cache of shared prompt prefixes. Off by default (vLLM's own "
        "default is on) so repetitions of the same prompts do not hit a cache their warmup "
        "filled; turn it on to measure a workload that really shares prefixes.",
        json_schema_extra=field_meta(load=True, short="prefix"),
    )
    enable_chunked_prefill: bool | None = Field(
        default=None,
        description="Split long prompts into chunks scheduled alongside decoding steps "
        "(none: vLLM's default).",
        json_schema_extra=field_meta(load=True, sweep=[False, True], short="chunked"),
    )
    kv_cache_dtype: Literal["auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        default="auto",
        description="Data type of the KV cache ('auto': the model's dtype).",
        json_schema_extra=field_meta(load=True, sweep=["auto", "fp8"], short="kv"),
    )
    quantization: str | None = Field(
        default=None,
        min_length=1,
        description="Weight quantization method vLLM applies or reads (fp8, awq, gptq, "
        "bitsandbytes, ...; none: from the checkpoint's own quantization config, if any).",
        json_schema_extra=field_meta(load=True, sweep=["fp8"], short="vllm_q"),
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Devices each layer is split over (tensor parallelism).",
        json_schema_extra=field_meta(load=True, sweep=[1, 2, 4, 8], short="vllm_tp"),
    )
    pipeline_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Devices the layers are spread over in stages (pipeline parallelism).",
        json_schema_extra=field_meta(load=True, sweep=[1, 2, 4], short="vllm_pp"),
    )
    distributed_executor_backend: Literal["ray", "mp", "uni", "external_launcher"] | None = Field(
        default=None,
        description="How vLLM runs its tensor and pipeline parallel workers: 'mp' (processes on "
        "this machine), 'ray' (a Ray cluster, across nodes), 'uni' (one process), "
        "'external_launcher' (torchrun starts the ranks); none: vLLM's choice. With 'ray', or "
        "more parallel ranks than this process sees GPUs, the case's energy covers only the GPUs "
        "this process measures, and the case is flagged multi_node.",
        json_schema_extra=field_meta(load=True, short="executor"),
    )
    swap_space: float | None = Field(
        default=None,
        ge=0.0,
        le=1024.0,
        description="CPU swap space per GPU in GiB for preempted requests (none: vLLM's default). "
        "Only vLLM versions that still take it: the V1 engine (vLLM 0.11 and later) has no swap "
        "space, and a value there is refused.",
        json_schema_extra=field_meta(load=True, sweep=[0.0, 4.0, 16.0], short="swap"),
    )
