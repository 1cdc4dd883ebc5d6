"""Workloads: the requests of a case, from any prompt source, with their input lengths.

:func:`build_prompt_set` turns a case's ``prompts`` parameter into requests: the built-in sets
and ``.jsonl`` files of :mod:`pytest_llem.data.prompts`, ShareGPT-style ``.json`` conversation
files, Hugging Face datasets (``hf:ORG/NAME`` or ``hf:PATH`` of one saved to disk), or synthetic
prompts of an exact token length. It asks the loaded backend's tokenizer for each prompt's
length, applies the case's overflow rule and records what it did, for the run record.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from pytest_llem.config.models import CaseConfig
from pytest_llem.data.lengths import DrawnLengths, draw_lengths
from pytest_llem.data.prompts import BUILTIN_PROMPT_SETS, builtin_set, parse_jsonl
from pytest_llem.data.requests import PromptTokenizer, Request
from pytest_llem.exceptions import BackendInferenceError, ConfigurationError

__all__ = [
    "DATASETS_INSTALL_HINT",
    "DEFAULT_PROMPT_COLUMNS",
    "SYNTHETIC",
    "PromptSet",
    "build_prompt_set",
]

#: The ``prompts`` value that asks for synthetic prompts of ``input_tokens`` tokens each.
SYNTHETIC = "synthetic"

#: Columns tried, in order, when a Hugging Face dataset's ``prompt_column`` is not given.
DEFAULT_PROMPT_COLUMNS: tuple[str, ...] = (
    "prompt",
    "text",
    "question",
    "instruction",
    "conversations",
)

#: How to install what ``prompts="hf:..."`` needs.
DATASETS_INSTALL_HINT = "pip install 'pytest-llem[datasets]'"

_HF_PREFIX = "hf:"
_USER_SPEAKERS = frozenset({"human", "user"})
_FIRST_CHUNK_MIN = 16
_HF_BATCH = 256

#: One item of a source's single pass: a prompt, or None for a row that holds none.
_Row = str | None


@dataclass(frozen=True)
class PromptSet:
    """The requests of one case and how they were made.

    Attributes:
        requests: One request per prompt, indexed 0..n-1 in source order.
        input_lengths: Prompt tokens of each request after truncation, in request order.
        source: The case's ``prompts`` value.
        overflow: What happened to prompts longer than ``max_input_tokens``: ``truncate``
            (the backend cuts them) or ``filter`` (they were dropped).
        truncated: Requests whose prompt is longer than ``max_input_tokens`` (truncate).
        filtered: Prompts drawn from the source and dropped as too long (filter); a prompt
            drawn again when the source is cycled counts again.
        notes: Short sentences about anything else worth recording (cycling, skipped rows).
    """

    requests: list[Request]
    input_lengths: list[int]
    source: str
    overflow: Literal["truncate", "filter"]
    truncated: int = 0
    filtered: int = 0
    notes: list[str] = field(default_factory=list)


def build_prompt_set(
    config: CaseConfig, backend: PromptTokenizer, *, count: int | None = None
) -> PromptSet:
    """Build the requests of a case from its prompt source.

    The source is read in order and repeated from the start when it holds fewer usable prompts
    than asked for. Each prompt is measured with ``backend.count_tokens`` (one call for the
    whole set unless prompts are filtered); prompts longer than ``config.max_input_tokens``
    are truncated by the backend or dropped, as ``config.prompt_overflow`` says.

    Args:
        config: The case: ``prompts``, ``input_tokens``, ``prompt_split``, ``prompt_column``,
            ``prompt_overflow``, ``max_input_tokens``, ``num_prompts`` and ``seed``.
        backend: A loaded backend, whose tokenizer counts the prompts.
        count: How many requests to build (default ``config.num_prompts``).

    Returns:
        Exactly ``count`` requests with their input lengths and what was done to fit them.

    Raises:
        ConfigurationError: The source cannot be found, read or parsed (with the file and
            position where there is one), holds no prompts, the ``datasets`` package is
            missing for ``hf:``, or no prompt fits ``max_input_tokens`` with
            ``prompt_overflow="filter"``.
    """
    wanted = config.num_prompts if count is None else count
    if wanted < 1:
        raise ConfigurationError(f"a prompt set needs at least 1 request, got count={wanted}")
    if config.prompts == SYNTHETIC:
        return _synthetic(config, backend, count=wanted)
    notes: list[str] = []
    rows = _source_rows(config, notes)
    return _select(rows, config=config, backend=backend, count=wanted, notes=notes)


# -- synthetic -----------------------------------------------------------------------------------


def _synthetic(config: CaseConfig, backend: PromptTokenizer, *, count: int) -> PromptSet:
    """``count`` prompts of ``input_tokens`` ids each (or of drawn lengths, with drawn output
    lengths, for ``lengths="sharegpt"``), uniform over the non-special ids."""
    import numpy as np

    if config.input_tokens is None and config.lengths == "exact":
        raise ConfigurationError("prompts='synthetic' needs input_tokens (the prompt length)")
    drawn = draw_lengths(config, count)
    limit = config.max_input_tokens
    if min(drawn.inputs) > limit and config.prompt_overflow == "filter":
        raise ConfigurationError(
            f"no prompt fits: synthetic prompts of input_tokens={config.input_tokens} are longer "
            f"than max_input_tokens={limit} and prompt_overflow='filter' drops them all"
        )
    vocabulary = backend.vocabulary()
    allowed = np.setdiff1d(
        np.arange(vocabulary.size, dtype=np.int64),
        np.fromiter(vocabulary.special_ids, dtype=np.int64, count=len(vocabulary.special_ids)),
    )
    if allowed.size == 0:
        raise ConfigurationError("the model's vocabulary has no ordinary (non-special) token")
    # Row i depends only on the seed and i, so a larger count extends a smaller one.
    rng = np.random.default_rng(config.seed)
    if drawn.outputs is None:
        length = drawn.inputs[0]
        rows = allowed[rng.integers(0, allowed.size, size=(count, length))].tolist()
    else:
        flat = allowed[rng.integers(0, allowed.size, size=sum(drawn.inputs))]
        rows = [part.tolist() for part in np.split(flat, np.cumsum(drawn.inputs)[:-1])]
    outputs: list[int | None] = list(drawn.outputs) if drawn.outputs else [None] * count
    requests = [
        Request(
            index=i,
            prompt=f"<synthetic {len(row)} tokens>",
            token_ids=tuple(row),
            output_tokens=out,
        )
        for i, (row, out) in enumerate(zip(rows, outputs, strict=True))
    ]
    truncated = sum(n > limit for n in drawn.inputs)
    notes = [_synthetic_note(config, drawn, count, int(allowed.size))]
    if truncated:
        notes.append(f"truncated all {count} prompts to max_input_tokens={limit}")
    return PromptSet(
        requests=requests,
        input_lengths=[min(n, limit) for n in drawn.inputs],
        source=config.prompts,
        overflow=config.prompt_overflow,
        truncated=truncated,
        filtered=0,
        notes=notes,
    )


def _synthetic_note(config: CaseConfig, drawn: DrawnLengths, count: int, ids: int) -> str:
    if drawn.outputs is None:
        return (
            f"{count} synthetic prompts of {drawn.inputs[0]} token ids drawn uniformly from "
            f"{ids} non-special ids (seed {config.seed})"
        )
    return (
        f"{count} synthetic prompts, lengths drawn from the ShareGPT-like mix (seed "
        f"{config.seed}): input {min(drawn.inputs)}-{max(drawn.inputs)} tokens (mean "
        f"{sum(drawn.inputs) / count:.0f}), output {min(drawn.outputs)}-{max(drawn.outputs)} "
        f"tokens (mean {sum(drawn.outputs) / count:.0f}), ids uniform over {ids} non-special ids"
    )


# -- selection -----------------------------------------------------------------------------------


def _select(
    rows: Iterable[_Row],
    *,
    config: CaseConfig,
    backend: PromptTokenizer,
    count: int,
    notes: list[str],
) -> PromptSet:
    """Draw ``count`` prompts from one pass over ``rows``, cycling it when it runs out."""
    limit = config.max_input_tokens
    drop = config.prompt_overflow == "filter"
    drawn = _draw(rows, backend=backend, count=count, limit=limit, drop=drop)
    if drawn.skipped:
        notes.append(f"skipped {drawn.skipped} source rows that hold no prompt")
    filtered = drawn.filtered
    if len(drawn.chosen) < count:
        filtered += _repeat(drawn, config=config, count=count, notes=notes)
    chosen = drawn.chosen
    requests = [Request(index=i, prompt=text) for i, (text, _) in enumerate(chosen)]
    truncated = 0 if drop else sum(length > limit for _, length in chosen)
    if truncated:
        notes.append(f"truncated {truncated} of {count} prompts to max_input_tokens={limit}")
    if filtered:
        notes.append(f"filtered out {filtered} prompts longer than max_input_tokens={limit}")
    return PromptSet(
        requests=requests,
        input_lengths=[min(length, limit) for _, length in chosen],
        source=config.prompts,
        overflow=config.prompt_overflow,
        truncated=truncated,
        filtered=filtered,
        notes=notes,
    )


@dataclass
class _Drawn:
    """What reading the source gave: each prompt read, with its length, and those chosen."""

    first_pass: list[tuple[str, int]] = field(default_factory=list)
    chosen: list[tuple[str, int]] = field(default_factory=list)
    skipped: int = 0  # rows that hold no prompt
    filtered: int = 0  # prompts dropped as too long (prompt_overflow="filter")


def _draw(
    rows: Iterable[_Row], *, backend: PromptTokenizer, count: int, limit: int, drop: bool
) -> _Drawn:
    """Read and measure rows in growing chunks until ``count`` prompts are chosen or the
    source ends (the rest of the chunk that completes the choice is measured too)."""
    source = iter(rows)
    drawn = _Drawn()
    chunk = max(count, _FIRST_CHUNK_MIN) if drop else count
    exhausted = False
    while len(drawn.chosen) < count and not exhausted:
        taken = list(islice(source, chunk))
        exhausted = len(taken) < chunk
        texts = [row for row in taken if row is not None]
        drawn.skipped += len(taken) - len(texts)
        chunk *= 2  # filtering may need more; read further ahead each time
        if not texts:
            continue
        lengths = backend.count_tokens(texts)
        _check_counts(texts, lengths)
        for text, length in zip(texts, lengths, strict=True):
            drawn.first_pass.append((text, length))
            if len(drawn.chosen) >= count:
                continue
            if drop and length > limit:
                drawn.filtered += 1
            else:
                drawn.chosen.append((text, length))
    return drawn


def _repeat(drawn: _Drawn, *, config: CaseConfig, count: int, notes: list[str]) -> int:
    """Fill ``drawn.chosen`` up to ``count`` from the whole source read again and again.

    Returns:
        How many prompts were dropped on the way.

    Raises:
        ConfigurationError: the source holds no prompt, or none that fits.
    """
    limit = config.max_input_tokens
    drop = config.prompt_overflow == "filter"
    first_pass = drawn.first_pass
    fitting = [item for item in first_pass if not (drop and item[1] > limit)]
    if not first_pass:
        raise ConfigurationError(f"prompt source {config.prompts!r} holds no prompts")
    if not fitting:
        raise ConfigurationError(
            f"no prompt fits: all {len(first_pass)} prompts of {config.prompts!r} are longer "
            f"than max_input_tokens={limit} and prompt_overflow='filter' drops them"
        )
    notes.append(
        f"the source holds {len(first_pass)} prompts ({len(fitting)} usable); "
        f"repeated from the start to make {count} requests"
    )
    return _cycle(first_pass, drawn.chosen, count=count, limit=limit, drop=drop)


def _cycle(
    first_pass: list[tuple[str, int]],
    chosen: list[tuple[str, int]],
    *,
    count: int,
    limit: int,
    drop: bool,
) -> int:
    """Fill ``chosen`` up to ``count`` by going over the whole pass again and again.

    Returns:
        How many prompts were dropped on the way.
    """
    filtered = 0
    while len(chosen) < count:
        for text, length in first_pass:
            if len(chosen) >= count:
                break
            if drop and length > limit:
                filtered += 1
            else:
                chosen.append((text, length))
    return filtered


def _check_counts(texts: Sequence[str], lengths: Sequence[int]) -> None:
    if len(lengths) != len(texts):
        raise BackendInferenceError(
            f"the backend counted tokens of {len(lengths)} prompts when given {len(texts)}"
        )


# -- sources -------------------------------------------------------------------------------------


def _source_rows(config: CaseConfig, notes: list[str]) -> Iterable[_Row]:
    """One pass over the case's prompt source, in source order."""
    source = config.prompts
    if source.startswith(_HF_PREFIX):
        return _hf_rows(config, notes)
    if source in BUILTIN_PROMPT_SETS:
        return builtin_set(source)
    path = Path(source).expanduser()
    if path.suffix.lower() == ".json":
        return _sharegpt_file(path, source=source, notes=notes)
    return _jsonl_file(path, source=source)


def _read_text(path: Path, *, source: str, what: str) -> str:
    if not path.is_file():
        raise ConfigurationError(
            f"prompt set {source!r} is neither a built-in set "
            f"({', '.join(BUILTIN_PROMPT_SETS)}) nor an existing {what}"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"cannot read prompt file {str(path)!r}: {e}") from e


def _jsonl_file(path: Path, *, source: str) -> tuple[str, ...]:
    """A ``.jsonl`` file of ``{"prompt": ...}`` lines, read as :func:`load_prompts` reads it."""
    text = _read_text(path, source=source, what=".jsonl file")
    return parse_jsonl(text, origin=f"prompt file {str(path)!r}")


def _sharegpt_file(path: Path, *, source: str, notes: list[str]) -> list[_Row]:
    """The first user turn of each conversation of a ShareGPT-style ``.json`` file.

    The file is a JSON list of objects, each with ``"conversations"`` (turns with ``"from"``
    and ``"value"``) or ``"messages"`` (turns with ``"role"`` and ``"content"``).
    Conversations without a user turn are skipped (None rows).
    """
    origin = f"conversation file {str(path)!r}"
    text = _read_text(path, source=source, what=".json conversation file")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigurationError(
            f"{origin}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg})"
        ) from e
    if not isinstance(records, list):
        raise ConfigurationError(
            f"{origin}: expected a JSON list of conversations (ShareGPT shape), "
            f"got {_json_type(records)}"
        )
    if not records:
        raise ConfigurationError(f"{origin} holds no conversations")
    rows: list[_Row] = []
    for number, record in enumerate(records):
        where = f"{origin}, conversation {number}"
        if isinstance(record, dict) and "id" in record:
            where += f" (id {record['id']!r})"
        if not isinstance(record, dict):
            raise ConfigurationError(f"{where}: expected an object, got {_json_type(record)}")
        turns = record.get("conversations", record.get("messages"))
        if turns is None:
            raise ConfigurationError(f'{where}: expected a "conversations" or "messages" list')
        rows.append(_first_user_turn(turns, where=where))
    return rows


def _first_user_turn(turns: Any, *, where: str) -> str | None:
    """The text of the first human/user turn of a conversation, None when it has none.

    Turns are ``{"from": ..., "value": ...}`` (ShareGPT) or ``{"role": ..., "content": ...}``
    (chat messages, where content may also be a list of ``{"type": "text", "text": ...}``).
    """
    if not isinstance(turns, list):
        raise ConfigurationError(f"{where}: expected a list of turns, got {_json_type(turns)}")
    for position, turn in enumerate(turns):
        here = f"{where}, turn {position}"
        if not isinstance(turn, dict):
            raise ConfigurationError(f"{here}: expected an object, got {_json_type(turn)}")
        speaker = turn.get("from", turn.get("role"))
        if not isinstance(speaker, str):
            raise ConfigurationError(f'{here}: expected a string "from" (or "role")')
        if speaker.strip().lower() not in _USER_SPEAKERS:
            continue
        content = turn.get("value", turn.get("content"))
        if isinstance(content, list):
            content = _text_parts(content, where=here)
        if not isinstance(content, str) or not content.strip():
            raise ConfigurationError(
                f'{here}: the user turn needs a non-empty string "value" (or "content")'
            )
        return content
    return None


def _text_parts(parts: list[Any], *, where: str) -> str:
    texts: list[str] = []
    for part in parts:
        if not isinstance(part, dict):
            raise ConfigurationError(f"{where}: a content part is {_json_type(part)}")
        if part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
    return "\n".join(texts)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


# -- Hugging Face datasets -----------------------------------------------------------------------


def _hf_rows(config: CaseConfig, notes: list[str]) -> Iterator[_Row]:
    """The prompt column of a Hugging Face dataset, read lazily in batches."""
    name = config.prompts[len(_HF_PREFIX) :].strip()
    if not name:
        raise ConfigurationError("prompts='hf:' needs a dataset name or path: 'hf:ORG/NAME'")
    dataset = _load_hf_dataset(name, split=config.prompt_split)
    columns = list(dataset.column_names)
    column = config.prompt_column
    if column is None:
        column = next((c for c in DEFAULT_PROMPT_COLUMNS if c in columns), None)
        if column is None:
            raise ConfigurationError(
                f"dataset {name!r} has none of the columns {', '.join(DEFAULT_PROMPT_COLUMNS)}; "
                f"set prompt_column to one of: {', '.join(columns)}"
            )
    elif column not in columns:
        raise ConfigurationError(
            f"dataset {name!r} has no column {column!r}; its columns are: {', '.join(columns)}"
        )
    notes.append(
        f"Hugging Face dataset {name!r}, split {config.prompt_split!r}, column {column!r} "
        f"({len(dataset)} rows)"
    )
    return _hf_column(dataset, column, origin=f"dataset {name!r}, column {column!r}")


def _hf_column(dataset: Any, column: str, *, origin: str) -> Iterator[_Row]:
    number = 0
    for batch in dataset.select_columns([column]).iter(batch_size=_HF_BATCH):
        for cell in batch[column]:
            yield _cell_prompt(cell, where=f"{origin}, row {number}")
            number += 1


def _cell_prompt(cell: Any, *, where: str) -> _Row:
    if cell is None:
        return None
    if isinstance(cell, str):
        return cell if cell.strip() else None
    if isinstance(cell, list):
        return _first_user_turn(cell, where=where)
    raise ConfigurationError(
        f"{where}: holds {type(cell).__name__}, not text or a conversation; "
        "set prompt_column to a text column"
    )


def _load_hf_dataset(name: str, *, split: str) -> Any:
    """A ``datasets.Dataset``: from disk when ``name`` is an existing path, else by name."""
    try:
        datasets: Any = importlib.import_module("datasets")
    except ImportError as e:
        raise ConfigurationError(
            f"prompts='hf:{name}' needs the datasets package: {DATASETS_INSTALL_HINT}"
        ) from e
    path = Path(name).expanduser()
    with _quiet_datasets(datasets):
        if path.exists():
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as e:
                raise ConfigurationError(
                    f"cannot load the dataset saved at {str(path)!r}: {type(e).__name__}: {e}"
                ) from e
        else:
            try:
                loaded = datasets.load_dataset(name, split=split)
            except Exception as e:
                raise ConfigurationError(
                    f"cannot load Hugging Face dataset {name!r} (split {split!r}): "
                    f"{type(e).__name__}: {_first_line(e)}"
                ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigurationError(
                f"dataset {name!r} has no split {split!r}; its splits are: "
                f"{', '.join(loaded.keys())} (set prompt_split)"
            )
        loaded = loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise ConfigurationError(
            f"dataset {name!r} loaded as {type(loaded).__name__}, not a Dataset"
        )
    return loaded


@contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    """Turn the datasets package's progress bars off for a block."""
    was_disabled = bool(datasets.are_progress_bars_disabled())
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
