"""A backend's prompts as token ids, and the vocabulary its model accepts.

Each engine tokenises with its own tokenizer (and on its own thread where the engine needs
that); what it does with the ids is the same everywhere and is written here once: requests that
carry ``token_ids`` are checked against the vocabulary, every prompt is truncated to
``max_input_tokens`` on the tokenizer's truncation side, and tokenizer failures become
:class:`~pytest_llem.exceptions.BackendInferenceError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pytest_llem.data.requests import Request, Vocabulary
from pytest_llem.exceptions import BackendInferenceError, LlemError

__all__ = ["Encoder", "count_prompt_tokens", "prompt_ids", "tokenizer_vocabulary"]

#: Tokenises a list of texts into one list of ids per text.
Encoder = Callable[[list[str]], list[list[int]]]


def prompt_ids(
    requests: Sequence[Request],
    *,
    encode: Encoder,
    vocabulary_size: int,
    max_input_tokens: int | None,
    truncation_side: str = "right",
    backend: str,
) -> list[list[int]]:
    """Each request's prompt ids, truncated to ``max_input_tokens``.

    Text prompts are tokenised in one call to ``encode``; requests that carry ``token_ids`` keep
    them. Both are cut on ``truncation_side`` (``"left"`` keeps the end of the prompt), so an
    encoder that already truncates gives the same ids.

    Args:
        requests: The prompts.
        encode: The backend's tokenizer call.
        vocabulary_size: Ids ``0 .. vocabulary_size - 1`` are accepted in ``token_ids``.
        max_input_tokens: The longest prompt kept; None keeps every prompt whole.
        truncation_side: The tokenizer's ``truncation_side``.
        backend: The backend's name, for messages.

    Returns:
        One list of ids per request, in order.

    Raises:
        BackendInferenceError: ``token_ids`` are empty or outside the vocabulary (an id past
            the embedding fails deep inside the engine, on CUDA as a device assert that
            poisons the context), or the tokenizer failed.
    """
    texts = [request.prompt for request in requests if request.token_ids is None]
    encoded = iter(encode_checked(encode, texts, backend=backend) if texts else [])
    rows: list[list[int]] = []
    for request in requests:
        if request.token_ids is None:
            ids = next(encoded)
        else:
            ids = _checked_ids(request, vocabulary_size=vocabulary_size, backend=backend)
        if max_input_tokens is not None and len(ids) > max_input_tokens:
            ids = ids[-max_input_tokens:] if truncation_side == "left" else ids[:max_input_tokens]
        rows.append(ids)
    return rows


def count_prompt_tokens(texts: Sequence[str], *, encode: Encoder, backend: str) -> list[int]:
    """Prompt tokens of each text by ``encode``, special tokens it adds included.

    Raises:
        BackendInferenceError: the tokenizer failed.
    """
    if not texts:
        return []
    return [len(ids) for ids in encode_checked(encode, list(texts), backend=backend)]


def encode_checked(encode: Encoder, texts: list[str], *, backend: str) -> list[list[int]]:
    """``encode(texts)`` as lists of ints; a tokenizer's failure becomes an inference error."""
    try:
        encoded = encode(texts)
    except LlemError:
        raise  # a CaseTimeoutError says nothing about the tokenizer
    except Exception as e:
        raise BackendInferenceError(f"{backend}: tokenizing failed: {e}") from e
    return [[int(token) for token in ids] for ids in encoded]


def _checked_ids(request: Request, *, vocabulary_size: int, backend: str) -> list[int]:
    ids = [int(token) for token in request.token_ids or ()]
    if not ids:
        raise BackendInferenceError(
            f"{backend}: request {request.index} has an empty token_ids prompt"
        )
    if any(not 0 <= token < vocabulary_size for token in ids):
        raise BackendInferenceError(
            f"{backend}: request {request.index} has token ids outside the vocabulary "
            f"(0..{vocabulary_size - 1})"
        )
    return ids


def tokenizer_vocabulary(tokenizer: Any, *, model_rows: int | None) -> Vocabulary:
    """The ids both a Hugging Face tokenizer and the model's embedding accept.

    Args:
        tokenizer: The loaded tokenizer (``len()``, ``all_special_ids``,
            ``added_tokens_decoder``).
        model_rows: Rows of the model's input embedding; None or 0 when unknown, so the
            tokenizer's size alone counts.

    Returns:
        The smaller of the two sizes, and the special ids (the tokenizer's special tokens and
        added tokens marked special) below it.
    """
    size = len(tokenizer)
    if model_rows:
        size = min(size, model_rows)
    special = {int(token) for token in getattr(tokenizer, "all_special_ids", ())}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special.update(
        int(token) for token, added in decoder.items() if getattr(added, "special", False)
    )
    return Vocabulary(size=size, special_ids=frozenset(t for t in special if 0 <= t < size))
