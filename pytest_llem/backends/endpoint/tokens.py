"""Prompt tokens for the endpoint backend: counted by the server's ``/tokenize`` where it has
one, else by the model's tokenizer on this machine; the ids are kept per text so a long prompt
can be sent truncated."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from pytest_llem.backends.base import Vocabulary
from pytest_llem.backends.endpoint.errors import NAME
from pytest_llem.backends.endpoint.transport import Transport
from pytest_llem.backends.support.checkpoint import resolve_model_source
from pytest_llem.backends.support.progress import ProgressCallback
from pytest_llem.backends.support.tokens import encode_checked, tokenizer_vocabulary
from pytest_llem.exceptions import (
    BackendConfigError,
    BackendInferenceError,
    LlemError,
    ModelLoadError,
)

__all__ = ["PromptTokens"]


class PromptTokens:
    """Token ids of prompts, cached per text, and the model's vocabulary.

    Args:
        transport: The client, for the server's ``/tokenize``.
        served: The model's name on the server.
        model: The case's model (a name, a folder or ``llem-tiny``).
        model_root: The model's folder or name as the server reports it.
        remote: Whether the server's ``/tokenize`` is used.
        progress: Called with short lines of text while llem-tiny is built.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        served: str,
        model: str,
        model_root: str | None,
        remote: bool,
        progress: ProgressCallback | None = None,
    ) -> None:
        self._transport = transport
        self._served = served
        self._model = model
        self._model_root = model_root
        self.remote = remote
        self._progress = progress
        self._ids: dict[str, tuple[int, ...]] = {}
        self._tokenizer: Any = None
        self._vocabulary: Vocabulary | None = None
        # Counting may run on a worker thread too (a prompt not counted before generating).
        self._lock = threading.Lock()

    def known(self, text: str) -> tuple[int, ...] | None:
        """The ids of ``text`` when it was counted before."""
        return self._ids.get(text)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens of each text (ids kept).

        Raises:
            BackendConfigError: neither the server nor this machine can tokenize for the model.
            BackendError: the server's ``/tokenize`` failed.
        """
        counts: list[int] = []
        for text in texts:
            ids = self._ids.get(text)
            if ids is None:
                ids = self._remote(text) if self.remote else self._local(text)
                self._ids[text] = ids
            counts.append(len(ids))
        return counts

    def _remote(self, text: str) -> tuple[int, ...]:
        body = self._transport.call(
            self._transport.fetch_json("POST", "/tokenize", {"model": self._served, "prompt": text})
        )
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list):
            url = self._transport.server.join("/tokenize")
            raise BackendInferenceError(f"{NAME}: {url} sent no token ids")
        return tuple(int(t) for t in tokens)

    def _local(self, text: str) -> tuple[int, ...]:
        with self._lock:
            tokenizer = self._local_tokenizer()
            (ids,) = encode_checked(
                lambda texts: tokenizer(texts, verbose=False)["input_ids"], [text], backend=NAME
            )
        return tuple(ids)

    def vocabulary(self) -> Vocabulary:
        """The ids the model accepts, from its tokenizer on this machine.

        Raises:
            BackendConfigError: the model's tokenizer is not on this machine.
        """
        if self._vocabulary is None:
            with self._lock:
                tokenizer = self._local_tokenizer()
            # The server's embedding is out of reach: the tokenizer's size alone counts.
            self._vocabulary = tokenizer_vocabulary(tokenizer, model_rows=None)
        return self._vocabulary

    def _local_tokenizer(self) -> Any:
        """The model's tokenizer from llem-tiny, a local folder (the case's model or the
        server's model root) or the local Hugging Face cache."""
        if self._tokenizer is not None:
            return self._tokenizer
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise BackendConfigError(
                NAME,
                "model",
                "the server has no /tokenize endpoint and transformers is not installed to "
                "tokenize here (pip install 'pytest-llem[transformers]')",
            ) from e
        failures: list[str] = []
        for source in self._sources():
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
                return self._tokenizer
            except LlemError:
                raise  # a CaseTimeoutError is not a missing tokenizer
            except Exception as e:
                failures.append(f"{source}: {type(e).__name__}")
        tried = "; ".join(failures) or "no candidate"
        raise BackendConfigError(
            NAME,
            "model",
            f"cannot tokenize for {self._model!r}: the server has no usable /tokenize "
            "endpoint and the model is not llem-tiny, a local folder or in the local Hugging "
            f"Face cache (tried {tried})",
        )

    def _sources(self) -> list[str]:
        """Where a tokenizer may be: the case's model and the server's model root, each as
        llem-tiny's folder, a local folder or a hub id (for the local cache)."""
        sources: list[str] = []
        for name in (self._model, self._model_root):
            if not name:
                continue
            try:
                sources.append(resolve_model_source(name, progress=self._progress).source)
            except ModelLoadError:
                sources.append(name)  # not here: tried anyway, so the error names it
        return list(dict.fromkeys(sources))
