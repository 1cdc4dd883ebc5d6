"""Prompt sets: the built-in ones shipped as package data, and user ``.jsonl`` files.

A case's ``prompts`` parameter names one of these; the harness asks :func:`load_prompts` for
exactly as many prompts as the workload needs.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from itertools import cycle, islice
from pathlib import Path

from pytest_llem.exceptions import ConfigurationError

__all__ = ["BUILTIN_PROMPT_SETS", "builtin_set", "load_prompts", "parse_jsonl"]

#: Names of the prompt sets shipped with the plugin (``pytest_llem/data/prompts/<name>.jsonl``).
BUILTIN_PROMPT_SETS: tuple[str, ...] = ("default",)


def load_prompts(source: str, *, num_prompts: int) -> list[str]:
    """Return the first ``num_prompts`` prompts of a prompt set, in file order.

    When the set holds fewer prompts than asked for, it is repeated from the start.

    Args:
        source: A built-in set name (see ``BUILTIN_PROMPT_SETS``) or the path of a ``.jsonl``
            file with one ``{"prompt": "..."}`` object per line (blank lines are skipped).
        num_prompts: How many prompts to return (at least 1).

    Returns:
        Exactly ``num_prompts`` prompt strings.

    Raises:
        ConfigurationError: ``source`` is neither a built-in name nor an existing file, the file
            cannot be read, a line is not a JSON object with a non-empty string ``"prompt"``,
            or the file holds no prompts.
    """
    if num_prompts < 1:
        raise ConfigurationError(f"num_prompts must be at least 1, got {num_prompts}")
    if source in BUILTIN_PROMPT_SETS:
        prompts: tuple[str, ...] = builtin_set(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigurationError(
                f"prompt set {source!r} is neither a built-in set "
                f"({', '.join(BUILTIN_PROMPT_SETS)}) nor an existing .jsonl file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigurationError(f"cannot read prompt file {str(path)!r}: {e}") from e
        prompts = parse_jsonl(text, origin=f"prompt file {str(path)!r}")
    return list(islice(cycle(prompts), num_prompts))


@functools.cache
def builtin_set(name: str) -> tuple[str, ...]:
    resource = resources.files("pytest_llem.data") / "prompts" / f"{name}.jsonl"
    try:
        text = resource.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(
            f"the built-in prompt set {name!r} is missing from the installed package: {e}"
        ) from e
    return parse_jsonl(text, origin=f"built-in prompt set {name!r}")


def parse_jsonl(text: str, *, origin: str) -> tuple[str, ...]:
    prompts: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigurationError(f"{origin}, line {number}: not valid JSON ({e.msg})") from e
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigurationError(
                f'{origin}, line {number}: expected an object with a non-empty string "prompt"'
            )
        prompts.append(prompt)
    if not prompts:
        raise ConfigurationError(f"{origin} holds no prompts")
    return tuple(prompts)
