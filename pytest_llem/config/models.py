"""Pydantic models for a benchmark case: the single source of truth for every parameter.

Each field carries its type, default, bounds and description. Fields whose change needs a new
model load say so with ``json_schema_extra={"load": True}``; the backend cache and (later) the
sweep introspection read that flag instead of keeping a list of their own.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

__all__ = [
    "BUILTIN_BACKENDS",
    "SAMPLING_PRESETS",
    "CaseConfig",
    "SamplingConfig",
    "TransformersConfig",
    "load_fields",
]

#: Backends shipped with the plugin. A conftest can add more through the plugin's hooks.
BUILTIN_BACKENDS: tuple[str, ...] = ("transformers",)

_LOAD: dict[str, Any] = {"load": True}

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
    )
    do_sample: bool = Field(
        default=False, description="Sample from the distribution instead of greedy."
    )
    temperature: float = Field(
        default=1.0, ge=0.0, le=10.0, description="Softmax temperature (only with do_sample)."
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 disables)."
    )
    top_k: int = Field(
        default=0, ge=0, le=100_000, description="Top-k sampling cut-off (0 disables)."
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
        json_schema_extra=_LOAD,
    )
    torch_compile: bool = Field(
        default=False,
        description="Wrap the model with torch.compile after loading.",
        json_schema_extra=_LOAD,
    )
    cache_implementation: Literal["auto", "dynamic", "static"] = Field(
        default="auto",
        description="KV-cache implementation for generate ('auto': the model's default).",
    )
    low_cpu_mem_usage: bool = Field(
        default=True,
        description="Load weights without a full extra copy in CPU memory.",
        json_schema_extra=_LOAD,
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow model repositories to run their own code.",
        json_schema_extra=_LOAD,
    )


class CaseConfig(_Strict):
    """Everything that defines one benchmark case.

    Precedence when a case is resolved: command line > ini/pyproject > marker > these defaults.
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
        json_schema_extra=_LOAD,
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Weight and activation dtype ('auto': bfloat16 on cuda, float32 on cpu).",
        json_schema_extra=_LOAD,
    )
    batch_size: int = Field(
        default=1, ge=1, le=4096, description="Requests per generate call (offline)."
    )
    max_input_tokens: int = Field(
        default=512, ge=1, le=1_048_576, description="Prompts are truncated to this many tokens."
    )
    max_new_tokens: int = Field(
        default=32, ge=1, le=1_048_576, description="Most output tokens generated per request."
    )
    min_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1_048_576,
        description="Fewest output tokens per request; equal to max_new_tokens fixes the length.",
    )
    num_prompts: int = Field(default=16, ge=1, le=1_000_000, description="Requests per repetition.")
    prompts: str = Field(
        default="default",
        min_length=1,
        description='A built-in prompt set name, or a path to a .jsonl file of {"prompt": ...}.',
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,  # type: ignore[arg-type]
        description="Decoding settings (a preset name or the fields).",
    )
    seed: int = Field(
        default=0, ge=0, le=2**32 - 1, description="Seed for sampling and prompt order."
    )
    warmup: int = Field(
        default=1, ge=0, le=1000, description="Unmeasured repetitions before measuring."
    )
    repeat: int = Field(
        default=3, ge=1, le=10_000, description="Measured repetitions (one window each)."
    )
    transformers: TransformersConfig = Field(
        default_factory=TransformersConfig,  # type: ignore[arg-type]
        description="Settings of the transformers backend.",
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
    def _check_lengths(self) -> CaseConfig:
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        if self.device == "cpu" and self.dtype == "float16":
            raise ValueError(
                "dtype=float16 is not supported on device=cpu; use bfloat16 or float32"
            )
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
