"""Tests of the prompt sets: the built-in set's shape, loading .jsonl files, cycling, errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from pytest_llem.data.prompts import BUILTIN_PROMPT_SETS, load_prompts
from pytest_llem.exceptions import ConfigurationError

__all__: list[str] = []


def _builtin_records() -> list[dict[str, str]]:
    text = (resources.files("pytest_llem.data") / "prompts" / "default.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_builtin_names() -> None:
    assert BUILTIN_PROMPT_SETS == ("default",)


def test_default_set_is_large_and_varied() -> None:
    records = _builtin_records()
    prompts = [r["prompt"] for r in records]
    assert len(prompts) >= 200
    assert len(set(prompts)) == len(prompts), "duplicate prompts"
    words = [len(p.split()) for p in prompts]
    short = sum(n <= 12 for n in words)
    long = sum(n >= 50 for n in words)
    assert short >= len(words) // 4, f"only {short} short prompts"
    assert long >= len(words) // 4, f"only {long} long prompts"
    assert max(words) >= 100
    assert len({r["topic"] for r in records}) >= 12
    assert all(isinstance(r["topic"], str) and r["topic"] for r in records)


def test_default_set_returns_file_order() -> None:
    expected = [r["prompt"] for r in _builtin_records()]
    assert load_prompts("default", num_prompts=10) == expected[:10]
    assert load_prompts("default", num_prompts=len(expected)) == expected


def test_default_set_cycles_when_asked_for_more() -> None:
    expected = [r["prompt"] for r in _builtin_records()]
    got = load_prompts("default", num_prompts=len(expected) + 3)
    assert got[len(expected) :] == expected[:3]


def test_returned_list_is_a_copy() -> None:
    first = load_prompts("default", num_prompts=3)
    first.clear()
    assert len(load_prompts("default", num_prompts=3)) == 3


def test_jsonl_file_with_blank_lines_and_extra_keys(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"prompt": "first", "topic": "x"}),
            "",
            "   ",
            json.dumps({"prompt": "second"}),
            json.dumps({"prompt": "third ü", "id": 3}),
        ],
    )
    assert load_prompts(str(path), num_prompts=3) == ["first", "second", "third ü"]
    assert load_prompts(str(path), num_prompts=2) == ["first", "second"]


def test_jsonl_file_cycles(tmp_path: Path) -> None:
    path = _write(tmp_path / "two.jsonl", ['{"prompt": "a"}', '{"prompt": "b"}'])
    assert load_prompts(str(path), num_prompts=5) == ["a", "b", "a", "b", "a"]


def test_unknown_name_lists_builtin_sets() -> None:
    with pytest.raises(ConfigurationError, match=r"'no-such-set'.*built-in set \(default\)"):
        load_prompts("no-such-set", num_prompts=1)


def test_folder_is_not_a_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"nor an existing \.jsonl file"):
        load_prompts(str(tmp_path), num_prompts=1)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ConfigurationError, match="cannot read prompt file") as info:
        load_prompts(str(path), num_prompts=1)
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", ['{"prompt": "ok"}', "", "{not json"])
    with pytest.raises(ConfigurationError, match=r"bad\.jsonl', line 3: not valid JSON"):
        load_prompts(str(path), num_prompts=1)


@pytest.mark.parametrize(
    "line",
    ['{"text": "no prompt key"}', '{"prompt": ""}', '{"prompt": "   "}', '{"prompt": 7}', '["a"]'],
)
def test_line_without_a_prompt(tmp_path: Path, line: str) -> None:
    path = _write(tmp_path / "p.jsonl", ['{"prompt": "ok"}', line])
    with pytest.raises(ConfigurationError, match=r"p\.jsonl', line 2: .*non-empty string"):
        load_prompts(str(path), num_prompts=1)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigurationError, match="holds no prompts"):
        load_prompts(str(path), num_prompts=1)


def test_num_prompts_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="at least 1"):
        load_prompts("default", num_prompts=0)
