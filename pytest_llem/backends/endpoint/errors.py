"""What the endpoint backend raises: HTTP statuses, error bodies and connection failures mapped
into the project's error hierarchy, each carrying the server's own message."""

from __future__ import annotations

import json
import socket
from typing import Any

from pytest_llem.backends.support.failures import says_out_of_memory
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendError,
    BackendInferenceError,
    BackendInitializationError,
    LlemError,
    RetryableError,
)

__all__ = [
    "NAME",
    "connection_error",
    "error_message",
    "error_of_event",
    "status_error",
]

NAME = "endpoint"
_MAX_ERROR_CHARS = 500


def _message_of(error: Any) -> str | None:
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        for key in ("message", "detail", "error"):
            value = error.get(key)
            if isinstance(value, str):
                return value
            nested = _message_of(value) if isinstance(value, (dict, list)) else None
            if nested:
                return nested
    if isinstance(error, list) and error:
        return "; ".join(str(_message_of(item) or item) for item in error)
    return None


def error_message(raw: bytes) -> str:
    """The server's own error message from an error body (OpenAI, FastAPI or plain text)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    message = _message_of(body) if body is not None else None
    return (message or text or "no message")[:_MAX_ERROR_CHARS]


def error_of_event(error: Any, *, url: str) -> LlemError:
    """The error an ``{"error": ...}`` event inside a stream means."""
    message = _message_of(error) or json.dumps(error)[:_MAX_ERROR_CHARS]
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return status_error(status, message, url=url)


def status_error(status: int, message: str, *, url: str) -> LlemError:
    """The error an HTTP status means, carrying the server's message."""
    text = f"HTTP {status} from {url}: {message}"
    # The engines' phrases, and a bare "OOM" that some servers answer with.
    if says_out_of_memory(message) or "oom" in message.lower().split():
        return RetryableError(f"{NAME}: the server ran out of memory: {text}")
    if status in (429, 503):
        return RetryableError(f"{NAME}: the server is busy: {text}")
    if status in (401, 403):
        return BackendConfigError(NAME, "endpoint.api_key_env", text)
    if status == 404:
        param = "endpoint.served_model" if "model" in message.lower() else "endpoint.url"
        return BackendConfigError(NAME, param, text)
    if 400 <= status < 500:
        return BackendConfigError(NAME, "request", text)
    return BackendInferenceError(f"{NAME}: {text}")


def connection_error(url: str, error: OSError) -> BackendError:
    """The error for a connection to ``url`` that could not be made."""
    if isinstance(error, ConnectionRefusedError):
        reason = "connection refused (is the server running on this machine?)"
    elif isinstance(error, socket.gaierror):
        reason = f"the host name does not resolve ({error})"
    else:
        reason = f"{type(error).__name__}: {error}"
    return BackendInitializationError(f"{NAME}: cannot connect to {url}: {reason}")
