"""How backends name what went wrong: out of memory, an engine failure, a call before load.

Out of memory is recognised once for every engine (torch's error type, ``MemoryError``, or the
phrases torch, vLLM and TensorRT-LLM use, anywhere in the chain of causes) because the harness
treats it differently: a :class:`~pytest_llem.exceptions.RetryableError` frees the model cache
and runs the case once more.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

from pytest_llem.exceptions import BackendInferenceError, LlemError, ModelLoadError, RetryableError

__all__ = [
    "engine_failure",
    "first_line",
    "is_out_of_memory",
    "load_errors",
    "require_loaded",
    "says_out_of_memory",
]

_T = TypeVar("_T")

#: Phrases of engine errors that mean memory ran out (device, host or KV cache); matched in
#: lower case with underscores read as spaces (``CUDA_ERROR_OUT_OF_MEMORY``).
_OUT_OF_MEMORY = (
    "out of memory",
    "no available memory for the cache blocks",
    "larger than the available kv cache memory",
    "is less than desired cpu memory utilization",
    "is less than requested memory for kv",
    "cannot allocate memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, means memory ran out."""
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return True
        if isinstance(oom_type, type) and isinstance(current, oom_type):
            return True
        if says_out_of_memory(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def says_out_of_memory(message: str) -> bool:
    """Whether an error message (an engine's, or a server's error body) says memory ran out."""
    text = message.lower().replace("_", " ")
    return any(phrase in text for phrase in _OUT_OF_MEMORY) or "outofmemory" in text


def first_line(error: BaseException) -> str:
    """The first line of an error's message (engines raise pages of log with theirs)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def engine_failure(
    error: BaseException, *, backend: str, what: str, memory: str = "memory"
) -> LlemError:
    """The plugin's error for an engine's failure during ``what`` (``"an engine step"``).

    Args:
        error: What the engine raised.
        backend: The backend's name, for the message.
        what: What failed, for the message.
        memory: The memory that runs out on this engine (``"GPU memory"``), for the message.

    Returns:
        ``error`` itself when it is already one of the plugin's; a RetryableError when memory
        ran out; otherwise a BackendInferenceError naming the error's type.
    """
    if isinstance(error, LlemError):
        return error
    if is_out_of_memory(error):
        return RetryableError(f"{backend}: out of {memory} during {what}: {first_line(error)}")
    return BackendInferenceError(
        f"{backend}: {what} failed: {type(error).__name__}: {first_line(error)}"
    )


@contextlib.contextmanager
def load_errors(
    *,
    backend: str,
    model: str,
    describe: Callable[[Exception], str],
    memory: str = "memory",
) -> Iterator[None]:
    """Turn what an engine raises while loading a model into the plugin's errors.

    Args:
        backend: The backend's name, for the message.
        model: The case's ``model``, for the message.
        describe: The ModelLoadError's message for any other failure.
        memory: The memory that runs out (``"GPU memory"``), for the message.

    Raises:
        LlemError: The plugin's own errors pass unchanged (a case timeout says nothing about
            the model).
        RetryableError: Memory ran out.
        ModelLoadError: Anything else, with ``describe(error)`` as its message.
    """
    try:
        yield
    except LlemError:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise RetryableError(
                f"{backend}: out of {memory} while loading {model!r}: {first_line(e)}"
            ) from e
        raise ModelLoadError(describe(e)) from e


def require_loaded(value: _T | None, *, backend: str, what: str) -> _T:
    """``value`` (an engine, a tokenizer) once the backend is loaded.

    Raises:
        BackendInferenceError: ``value`` is None: ``what`` was called before ``load()``.
    """
    if value is None:
        raise BackendInferenceError(f"{backend}: {what}() called before load()")
    return value
