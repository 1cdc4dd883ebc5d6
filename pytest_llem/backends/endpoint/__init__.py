"""The endpoint backend: an OpenAI-compatible HTTP server (vLLM, trtllm-serve, SGLang, TGI,
llama.cpp) that runs on the measured machine.

Every request is one streamed ``POST /v1/completions``; the arrival time of each server-sent
event is the time of the tokens it carries. Energy comes from this machine's meters, so the
server must run here; its process is not ours, so no peak memory is reported.

Modules: :mod:`.transport` (aiohttp on an event loop thread, server-sent events),
:mod:`.probing` (what the server supports, found at load), :mod:`.stream` (one completion's
events and how its tokens are counted), :mod:`.payloads`, :mod:`.tokens` (prompt tokenization)
and :mod:`.adapter` (the Backend protocol); :mod:`.errors` maps failures into the hierarchy.
"""

from __future__ import annotations

from pytest_llem.backends.endpoint.adapter import EndpointBackend
from pytest_llem.backends.endpoint.stream import COUNTING_LABELS

__all__ = ["COUNTING_LABELS", "EndpointBackend"]
