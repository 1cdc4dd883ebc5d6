"""Rules between parameters, declared once: the case model rejects a case breaking a ``valid``
rule, and a sweep skips such combinations (and, where no GPU is visible, the ``gpu`` ones) with
the rule as its reason."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from pytest_llem.config.case import CaseConfig

__all__ = ["CONSTRAINTS", "Constraint"]


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
        lambda c: (
            c.lengths != "exact" or (c.prompts == "synthetic") == (c.input_tokens is not None)
        ),
    ),
    Constraint(
        "drawn-lengths-are-synthetic",
        ("lengths", "prompts", "input_tokens"),
        "lengths='sharegpt' draws the lengths of prompts='synthetic' and takes no input_tokens",
        lambda c: c.lengths == "exact" or (c.prompts == "synthetic" and c.input_tokens is None),
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
