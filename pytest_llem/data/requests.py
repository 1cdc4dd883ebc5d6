"""The requests of a workload and what a tokenizer tells about them.

These types sit below both :mod:`pytest_llem.data.workloads` (which builds requests) and
:mod:`pytest_llem.backends` (which completes them), so the data layer needs nothing of the
backends: it sees a loaded backend only as a :class:`PromptTokenizer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["PromptTokenizer", "Request", "Vocabulary"]


@dataclass(frozen=True)
class Request:
    """One prompt to complete. ``index`` is its position in the workload.

    When ``token_ids`` is set, the backend feeds exactly these ids as the prompt (truncated to
    ``max_input_tokens`` like a text prompt) and ``prompt`` is only a description of them.
    When ``output_tokens`` is set, the request generates exactly that many tokens (end of
    sequence ignored) in place of the call's ``max_new_tokens``/``min_new_tokens``: a workload
    whose output lengths are drawn per request.
    """

    index: int
    prompt: str
    token_ids: tuple[int, ...] | None = None
    output_tokens: int | None = None


@dataclass(frozen=True)
class Vocabulary:
    """The token ids a loaded model accepts as input.

    Attributes:
        size: Ids ``0 .. size - 1`` are valid inputs of both the tokenizer and the model.
        special_ids: Ids of special tokens (padding, begin and end of sequence, ...).
    """

    size: int
    special_ids: frozenset[int]


@runtime_checkable
class PromptTokenizer(Protocol):
    """Protocol of what a workload needs from a loaded backend: its tokenizer's view.

    Every :class:`~pytest_llem.backends.base.Backend` is one.
    """

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Prompt tokens of each text as the backend would count them, before truncation."""
        ...

    def vocabulary(self) -> Vocabulary:
        """The ids the loaded model accepts."""
        ...
