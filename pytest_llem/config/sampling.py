"""Decoding settings of a case (``sampling.*``) and the named presets they start from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pytest_llem.config.fields import StrictModel, field_meta

__all__ = ["SAMPLING_PRESETS", "SamplingConfig"]

#: Named sampling settings; a preset fills the sampling fields the user did not set.
SAMPLING_PRESETS: dict[str, dict[str, Any]] = {
    "deterministic": {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
    "standard": {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
    "creative": {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "top_k": 50},
}


class SamplingConfig(StrictModel):
    """How output tokens are chosen. Greedy decoding (``deterministic``) unless told otherwise."""

    preset: Literal["deterministic", "standard", "creative", "custom"] = Field(
        default="deterministic",
        description="Named sampling settings; explicit fields override the preset's values.",
        json_schema_extra=field_meta(
            sweep=["deterministic", "standard", "creative"], short="sampling"
        ),
    )
    do_sample: bool = Field(
        default=False,
        description="Sample from the distribution instead of greedy.",
        json_schema_extra=field_meta(short="sample"),
    )
    temperature: float = Field(
        default=1.0,
        ge=0.0,
        le=10.0,
        description="Softmax temperature (only with do_sample).",
        json_schema_extra=field_meta(sweep=[0.5, 1.0, 1.5], short="t"),
    )
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling mass (1 disables).",
        json_schema_extra=field_meta(sweep=[0.5, 0.9, 1.0], short="top_p"),
    )
    top_k: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description="Top-k sampling cut-off (0 disables).",
        json_schema_extra=field_meta(sweep=[0, 10, 50], short="top_k"),
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
