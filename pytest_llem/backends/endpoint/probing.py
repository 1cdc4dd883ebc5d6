"""What the endpoint backend learns about a server at load time: the served model's entry,
the server's version, whether it tokenizes, and which extensions and counting method its
completions stream supports (found by a two-token completion)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pytest_llem.backends.endpoint.errors import NAME
from pytest_llem.backends.endpoint.payloads import EXTENSION_GROUPS, completion_payload
from pytest_llem.backends.endpoint.stream import ALLOWED, Method, StreamedCompletion, collect
from pytest_llem.backends.endpoint.transport import Transport
from pytest_llem.exceptions import BackendConfigError, BackendInferenceError

__all__ = ["Features", "ServerFacts", "probe_server"]

logger = logging.getLogger("pytest_llem")

_PROBE_PROMPT = "Hello"
_PROBE_TOKENS = 2


@dataclass(frozen=True)
class Features:
    """What the server accepted when probed at load time."""

    extensions: frozenset[str]
    method: Method
    usage_in_stream: bool


@dataclass(frozen=True)
class ServerFacts:
    """Everything probed at load time.

    Attributes:
        entry: The served model's ``/v1/models`` entry (empty when the server lists none).
        version: The server's ``/version``, where it answers one.
        tokenize: Whether the server has a vLLM-style ``/tokenize`` returning token ids.
        features: The extensions and the counting method its streams support.
    """

    entry: dict[str, Any]
    version: str | None
    tokenize: bool
    features: Features

    @property
    def model_root(self) -> str | None:
        """The model's folder or name as the server reports it (vLLM's ``root``)."""
        root = self.entry.get("root")
        return str(root) if isinstance(root, str) and root else None


async def probe_server(transport: Transport, *, served: str, token_source: str) -> ServerFacts:
    """Probe the server behind ``transport`` for model ``served``.

    Raises:
        BackendConfigError: the server does not serve the model, refuses the key, or cannot
            provide the counting method ``token_source`` asks for.
        BackendError: the server cannot be reached or failed.
    """
    entry = await _served_model_entry(transport, served)
    version = await _server_version(transport)
    tokenize = await _probe_tokenize(transport, served)
    features = await _probe_completions(transport, served, token_source)
    return ServerFacts(entry, version, tokenize, features)


async def _served_model_entry(transport: Transport, served: str) -> dict[str, Any]:
    body = await transport.fetch_json("GET", "/v1/models")
    data = body.get("data") if isinstance(body, dict) else None
    entries = [e for e in data or [] if isinstance(e, dict) and "id" in e]
    if not entries:
        return {}
    for entry in entries:
        if entry["id"] == served:
            return entry
    listed = ", ".join(repr(e["id"]) for e in entries)
    raise BackendConfigError(
        NAME,
        "endpoint.served_model",
        f"the server at {transport.server.url} serves {listed}, not {served!r}; set "
        "--llem-model to the model it serves, or endpoint.served_model to its name there",
    )


async def _server_version(transport: Transport) -> str | None:
    try:
        body = await transport.fetch_json("GET", "/version", missing_ok=True)
    except (BackendConfigError, BackendInferenceError) as e:
        logger.info("the server's /version is not usable: %s", e)
        return None
    version = body.get("version") if isinstance(body, dict) else None
    return str(version) if version is not None else None


async def _probe_tokenize(transport: Transport, served: str) -> bool:
    try:
        body = await transport.fetch_json(
            "POST", "/tokenize", {"model": served, "prompt": _PROBE_PROMPT}, missing_ok=True
        )
    except (BackendConfigError, BackendInferenceError) as e:
        logger.info("the server's /tokenize is not usable: %s", e)
        return False
    return isinstance(body, dict) and isinstance(body.get("tokens"), list)


async def _probe_completions(transport: Transport, served: str, token_source: str) -> Features:
    """Send a two-token completion with every extension, dropping those the server rejects,
    and see which counting method the stream supports."""
    extensions = {"stream_options", "min_tokens", "ignore_eos"}
    if token_source in ("auto", "return_token_ids"):
        extensions.add("return_token_ids")
    if token_source == "logprobs":
        extensions.add("return_tokens_as_token_ids")
    groups = [g for g in EXTENSION_GROUPS if extensions.intersection(g)]
    while True:
        payload = completion_payload(
            served=served,
            prompt=_PROBE_PROMPT,
            max_tokens=_PROBE_TOKENS,
            min_tokens=_PROBE_TOKENS,
            extensions=extensions,
            token_source=token_source,
        )
        try:
            stream = await collect(transport, payload)
            break
        except BackendConfigError as e:
            if not groups or e.param != "request":
                raise
            dropped = groups.pop(0)
            logger.info("the server rejected %s (%s); trying without", dropped, e)
            extensions.difference_update(dropped)
    return Features(frozenset(extensions), _method(transport, stream, token_source), _usage(stream))


def _method(transport: Transport, stream: StreamedCompletion, token_source: str) -> Method:
    usable = [m for m in stream.available() if m in ALLOWED[token_source]]
    if not usable:
        raise BackendConfigError(
            NAME,
            "endpoint.token_source",
            f"the server at {transport.server.url} does not stream what token_source="
            f"{token_source!r} needs (it sent: {', '.join(stream.available())})",
        )
    return usable[0]


def _usage(stream: StreamedCompletion) -> bool:
    return stream.usage is not None
