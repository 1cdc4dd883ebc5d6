"""The config of one benchmark case: every parameter a test can set, with the engine groups,
traffic, SLO and sampling settings nested in it, and the rules between them enforced."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from pytest_llem.config.constraints import CONSTRAINTS
from pytest_llem.config.engines import (
    EndpointConfig,
    TensorRTConfig,
    TransformersConfig,
    VllmConfig,
)
from pytest_llem.config.fields import StrictModel, field_meta
from pytest_llem.config.sampling import SamplingConfig
from pytest_llem.config.traffic import SloConfig, TrafficConfig

__all__ = ["AUTO_REPEAT_PLANNED", "BUILTIN_BACKENDS", "CaseConfig", "load_fields"]

#: Windows a ``repeat="auto"`` case counts as in duration and cost estimates: the default of
#: ``--llem-max-repeat``, the most it takes (it usually stops sooner).
AUTO_REPEAT_PLANNED = 30

#: Backends shipped with the plugin. A conftest can add more through the plugin's hooks.
BUILTIN_BACKENDS: tuple[str, ...] = ("transformers", "endpoint", "tensorrt", "vllm")

_LOAD = field_meta(load=True)


class CaseConfig(StrictModel):
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
        json_schema_extra=field_meta(load=True, sweep=["cpu", "cuda"]),
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Weight and activation dtype ('auto': bfloat16 on cuda, float32 on cpu).",
        json_schema_extra=field_meta(load=True, sweep=["float32", "float16", "bfloat16"]),
    )
    batch_size: int = Field(
        default=1,
        ge=1,
        le=4096,
        description="Requests per generate call (offline).",
        json_schema_extra=field_meta(sweep=[1, 4, 16, 64], short="bs"),
    )
    max_input_tokens: int = Field(
        default=512,
        ge=1,
        le=1_048_576,
        description="Prompts are truncated to this many tokens.",
        json_schema_extra=field_meta(sweep=[128, 512, 2048], short="in"),
    )
    max_new_tokens: int = Field(
        default=32,
        ge=1,
        le=1_048_576,
        description="Most output tokens generated per request.",
        json_schema_extra=field_meta(sweep=[16, 64, 256], short="out"),
    )
    min_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1_048_576,
        description="Fewest output tokens per request; equal to max_new_tokens fixes the length.",
        json_schema_extra=field_meta(sweep=[1, 16, 64], short="min"),
    )
    num_prompts: int = Field(
        default=16,
        ge=1,
        le=1_000_000,
        description="Requests per repetition.",
        json_schema_extra=field_meta(sweep=[16, 64, 256], short="n"),
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
        json_schema_extra=field_meta(sweep=[128, 512, 2048], short="isl"),
    )
    lengths: Literal["exact", "sharegpt"] = Field(
        default="exact",
        description="Lengths of prompts='synthetic': 'exact' (every prompt input_tokens long, "
        "outputs as max_new_tokens and min_new_tokens say) or 'sharegpt' (input and output "
        "lengths drawn per request from a seeded ShareGPT-like mix, capped at max_input_tokens "
        "and max_new_tokens; input_tokens is not used).",
        json_schema_extra=field_meta(short="len"),
    )
    workload: Literal["chat", "summarisation", "generation", "fixed"] | None = Field(
        default=None,
        description="Label of the workload shape the case runs (the shipped suites set it; "
        "the scorecard groups by it): chat, summarisation, generation or fixed.",
        json_schema_extra=field_meta(
            sweep=["chat", "summarisation", "generation", "fixed"], short="wl"
        ),
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
        json_schema_extra=field_meta(short="overflow"),
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="Decoding settings (a preset name or the fields).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Seed for sampling and prompt order.",
        json_schema_extra=field_meta(sweep=[0, 1, 2], short="seed"),
    )
    warmup: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Unmeasured repetitions before measuring.",
        json_schema_extra=field_meta(sweep=[0, 1, 3], short="warmup"),
    )
    repeat: Annotated[int, Field(ge=1, le=10_000)] | Literal["auto"] = Field(
        default=3,
        description="Measured repetitions (one window each), or auto: windows until every "
        "gated verdict is decided (with --llem-compare and --llem-fail-on) or, without a gate, "
        "every reported metric's interval is narrower than --llem-target-ci, up to "
        "--llem-max-repeat windows or --llem-max-case-s seconds; it looks after 3, 5, 8, 12, "
        "18, 27 and 30 windows at a Bonferroni-corrected level (99.3% for 30), and the gate "
        "judges at that level (docs/ci.md, Adaptive repetitions).",
        json_schema_extra=field_meta(sweep=[3, 5, 10], short="rep"),
    )
    prefill_check: bool = Field(
        default=False,
        description="Per measured window, also measure prefill energy by subtraction (the "
        "same requests generating one new token each, optimum-benchmark's way) next to the "
        "attributed prefill energy, so the attribution's error is visible.",
    )
    scenario: Literal["offline", "single_stream", "server"] = Field(
        default="offline",
        description="How requests are issued: offline (all at once, in batches of batch_size), "
        "single_stream (one at a time), server (arrivals on a schedule, see traffic).",
        json_schema_extra=field_meta(sweep=["offline", "single_stream", "server"]),
    )
    traffic: TrafficConfig = Field(
        default_factory=TrafficConfig,
        description="Arrival schedule of the server scenario.",
    )
    slo: SloConfig = Field(
        default_factory=SloConfig,
        description="Service-level bounds for goodput and energy per good request.",
    )
    transformers: TransformersConfig = Field(
        default_factory=TransformersConfig,
        description="Settings of the transformers backend.",
    )
    endpoint: EndpointConfig = Field(
        default_factory=EndpointConfig,
        description="Settings of the endpoint backend (an OpenAI-compatible server).",
    )
    tensorrt: TensorRTConfig = Field(
        default_factory=TensorRTConfig,
        description="Settings of the TensorRT-LLM backend.",
    )
    vllm: VllmConfig = Field(
        default_factory=VllmConfig,
        description="Settings of the vLLM backend.",
    )

    @property
    def planned_repeat(self) -> int:
        """Windows to plan for: ``repeat``, or :data:`AUTO_REPEAT_PLANNED` for ``auto``."""
        return AUTO_REPEAT_PLANNED if self.repeat == "auto" else self.repeat

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
