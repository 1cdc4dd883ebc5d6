"""The base every engine adapter is built on: the case it loads and where progress goes.

Every built-in backend is constructed as ``Backend(config, progress=...)`` by the backend
registry, keeps the facts of its loaded model and its tokenizer until ``close()``, derives the
vocabulary from both, and reports slow steps the same way; that is written here once. The dtypes an engine accepts are the case's own ``dtype``
choices, read from the config model so the two cannot drift apart.
"""

from __future__ import annotations

import typing
from typing import Any

from pytest_llem.backends.base import BackendCapabilities, BackendInfo
from pytest_llem.backends.support.failures import require_loaded
from pytest_llem.backends.support.progress import ProgressCallback, report
from pytest_llem.backends.support.tokens import tokenizer_vocabulary
from pytest_llem.config.models import CaseConfig
from pytest_llem.data.requests import Vocabulary

__all__ = ["CASE_DTYPES", "EngineAdapter"]

#: The values of a case's ``dtype`` (``auto`` first): what the torch-based engines accept.
CASE_DTYPES: tuple[str, ...] = typing.get_args(CaseConfig.model_fields["dtype"].annotation)


class EngineAdapter:
    """Base of an inference engine adapter.

    Args:
        config: The case whose load-relevant fields (model, device, dtype and the engine's own
            section) decide what is loaded.
        progress: Called with short lines of text during slow steps (building ``llem-tiny``,
            loading the model, starting or building an engine).
    """

    name: str
    capabilities: BackendCapabilities

    def __init__(self, config: CaseConfig, *, progress: ProgressCallback | None = None) -> None:
        self._config = config
        self._progress = progress
        #: Facts of the loaded model; None until ``load()`` and after ``close()``.
        self._info: BackendInfo | None = None
        #: The engine's Hugging Face tokenizer; None until ``load()`` and after ``close()``.
        self._tokenizer: Any = None
        self._vocabulary: Vocabulary | None = None

    def vocabulary(self) -> Vocabulary:
        """The ids both the tokenizer and the model's input embedding accept, and the special
        ones (worked out once per load).

        Raises:
            BackendInferenceError: the backend is not loaded.
        """
        tokenizer = require_loaded(self._tokenizer, backend=self.name, what="vocabulary")
        if self._vocabulary is None:
            rows = self._embedding_rows()
            self._vocabulary = tokenizer_vocabulary(tokenizer, model_rows=rows)
        return self._vocabulary

    def _embedding_rows(self) -> int | None:
        """Rows of the loaded model's input embedding; None where only the tokenizer tells."""
        return None

    def _report(self, message: str) -> None:
        """Log a progress line and show it to the user."""
        report(self._progress, message)
