"""Tests of workloads: synthetic prompts, overflow rules, ShareGPT files, Hugging Face datasets.

The fake backend counts a prompt's words as its tokens; the tests with the real tiny model check
that the transformers backend counts what ``generate`` feeds and honours ``Request.token_ids``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llem.backends.base import GenerateParams, Request, Vocabulary
from pytest_llem.config.models import CaseConfig
from pytest_llem.data.prompts import load_prompts
from pytest_llem.data.workloads import DATASETS_INSTALL_HINT, PromptSet, build_prompt_set
from pytest_llem.exceptions import BackendInferenceError, ConfigurationError
from tests.fakes.fake_backend import FakeBackend, FakeClock

__all__: list[str] = []

HAS_DATASETS = importlib.util.find_spec("datasets") is not None
NEEDS_DATASETS = pytest.mark.skipif(
    not HAS_DATASETS, reason=f"the datasets package is not installed ({DATASETS_INSTALL_HINT})"
)


@pytest.fixture
def fake() -> FakeBackend:
    backend = FakeBackend(FakeClock(), vocab_size=64)
    backend.load()
    return backend


def _case(**fields: Any) -> CaseConfig:
    return CaseConfig.model_validate(fields)


def _texts(prompt_set: PromptSet) -> list[str]:
    return [r.prompt for r in prompt_set.requests]


def _jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return path


def _json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# -- synthetic -----------------------------------------------------------------------------------


def test_synthetic_prompts_have_exactly_input_tokens_ordinary_ids(fake: FakeBackend) -> None:
    got = build_prompt_set(_case(prompts="synthetic", input_tokens=40, num_prompts=16), fake)
    assert len(got.requests) == 16
    assert [r.index for r in got.requests] == list(range(16))
    assert got.input_lengths == [40] * 16
    assert (got.truncated, got.filtered, got.overflow, got.source) == (
        0,
        0,
        "truncate",
        "synthetic",
    )
    special = fake.vocabulary().special_ids
    drawn: set[int] = set()
    for request in got.requests:
        assert request.token_ids is not None
        assert len(request.token_ids) == 40
        assert request.prompt == "<synthetic 40 tokens>"
        assert all(isinstance(t, int) and 0 <= t < 64 for t in request.token_ids)
        drawn.update(request.token_ids)
    assert not drawn & special
    assert drawn == set(range(3, 64))  # 640 uniform draws over 61 ids cover them all
    assert fake.count_calls == []  # the length is exact: nothing to count


def test_synthetic_prompts_are_reproducible_by_seed(fake: FakeBackend) -> None:
    def ids(seed: int, count: int | None = None) -> list[tuple[int, ...] | None]:
        case = _case(prompts="synthetic", input_tokens=8, num_prompts=6, seed=seed)
        return [r.token_ids for r in build_prompt_set(case, fake, count=count).requests]

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)
    assert ids(0, count=20)[:6] == ids(0)  # more requests extend the same draw


def test_synthetic_prompts_feed_the_backend_their_ids(fake: FakeBackend) -> None:
    got = build_prompt_set(_case(prompts="synthetic", input_tokens=7, num_prompts=3), fake)
    out = fake.generate(got.requests, params=GenerateParams(max_new_tokens=2, max_input_tokens=9))
    assert [g.input_tokens for g in out] == got.input_lengths == [7, 7, 7]


def test_sharegpt_lengths_are_drawn_per_request_within_the_caps(fake: FakeBackend) -> None:
    case = _case(
        prompts="synthetic",
        lengths="sharegpt",
        num_prompts=40,
        max_input_tokens=50,
        max_new_tokens=1000,
        min_new_tokens=2,
        seed=3,
    )
    got = build_prompt_set(case, fake)
    inputs = [len(r.token_ids or ()) for r in got.requests]
    outputs = [r.output_tokens for r in got.requests]
    assert inputs == got.input_lengths
    assert got.truncated == 0
    assert all(4 <= n <= 50 for n in inputs)
    assert len(set(inputs)) > 5
    assert all(o is not None and 2 <= o <= 1000 for o in outputs)
    assert len(set(outputs)) > 5
    assert "ShareGPT-like mix (seed 3)" in got.notes[0]
    # the backend generates each request's own length
    out = fake.generate(got.requests, params=GenerateParams(max_new_tokens=1000))
    assert [g.output_tokens for g in out] == outputs
    # a larger count extends a smaller one; another seed draws other lengths
    more = build_prompt_set(case.model_copy(update={"num_prompts": 60}), fake)
    assert [r.token_ids for r in more.requests[:40]] == [r.token_ids for r in got.requests]
    assert [r.output_tokens for r in more.requests[:40]] == outputs
    other = build_prompt_set(case.model_copy(update={"seed": 4}), fake)
    assert [r.output_tokens for r in other.requests] != outputs


def test_the_sharegpt_mix_has_the_documented_means() -> None:
    from pytest_llem.data.lengths import SHAREGPT_MIX, draw_lengths

    case = _case(
        prompts="synthetic",
        lengths="sharegpt",
        max_input_tokens=1_000_000,
        max_new_tokens=1_000_000,
    )
    drawn = draw_lengths(case, 20_000)
    assert drawn.outputs is not None
    assert sum(drawn.inputs) / 20_000 == pytest.approx(SHAREGPT_MIX.input_mean, rel=0.05)
    assert sum(drawn.outputs) / 20_000 == pytest.approx(SHAREGPT_MIX.output_mean, rel=0.05)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lengths": "sharegpt"}, "lengths='sharegpt' draws the lengths of prompts='synthetic'"),
        (
            {"lengths": "sharegpt", "prompts": "synthetic", "input_tokens": 8},
            "takes no input_tokens",
        ),
    ],
)
def test_drawn_lengths_need_synthetic_prompts_without_input_tokens(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _case(**fields)


def test_synthetic_longer_than_max_input_tokens(fake: FakeBackend) -> None:
    case = _case(prompts="synthetic", input_tokens=12, max_input_tokens=5, num_prompts=4)
    got = build_prompt_set(case, fake)
    assert got.input_lengths == [5] * 4
    assert got.truncated == 4
    assert any("truncated all 4" in note for note in got.notes)
    params = GenerateParams(max_new_tokens=1, max_input_tokens=5)
    assert [g.input_tokens for g in fake.generate(got.requests, params=params)] == [5] * 4
    with pytest.raises(ConfigurationError, match="no prompt fits"):
        build_prompt_set(case.model_copy(update={"prompt_overflow": "filter"}), fake)


def test_synthetic_needs_ordinary_ids() -> None:
    tiny = FakeBackend(FakeClock(), vocab_size=3)  # only the three special ids
    tiny.load()
    with pytest.raises(ConfigurationError, match="no ordinary"):
        build_prompt_set(_case(prompts="synthetic", input_tokens=2), tiny)


# -- built-in sets and .jsonl files --------------------------------------------------------------


def test_builtin_set_passes_through_with_one_count(fake: FakeBackend) -> None:
    got = build_prompt_set(_case(num_prompts=24, max_input_tokens=100_000), fake)
    expected = load_prompts("default", num_prompts=24)
    assert _texts(got) == expected
    assert all(r.token_ids is None for r in got.requests)
    assert got.input_lengths == [len(p.split()) for p in expected]
    assert (got.truncated, got.filtered, got.source) == (0, 0, "default")
    assert fake.count_calls == [24]


def test_count_overrides_num_prompts(fake: FakeBackend) -> None:
    got = build_prompt_set(_case(num_prompts=4), fake, count=9)
    assert _texts(got) == load_prompts("default", num_prompts=9)
    assert [r.index for r in got.requests] == list(range(9))
    with pytest.raises(ConfigurationError, match="at least 1"):
        build_prompt_set(_case(), fake, count=0)


def test_jsonl_file_is_cycled_in_order(fake: FakeBackend, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", ["one", "two words", "three words here"])
    got = build_prompt_set(_case(prompts=str(path), num_prompts=7), fake)
    assert _texts(got) == load_prompts(str(path), num_prompts=7)
    assert got.input_lengths == [1, 2, 3, 1, 2, 3, 1]
    assert fake.count_calls == [3]  # each source prompt is counted once
    assert any("repeated from the start" in note for note in got.notes)


def test_jsonl_errors_are_the_prompt_set_errors(fake: FakeBackend, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="neither a built-in set"):
        build_prompt_set(_case(prompts="no-such-set"), fake)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match="line 2"):
        build_prompt_set(_case(prompts=str(bad)), fake)


# -- overflow ------------------------------------------------------------------------------------

# Word counts 3, 10, 4, 12, 5 against max_input_tokens=6: the second and fourth are too long.
LENGTHS = [3, 10, 4, 12, 5]


@pytest.fixture
def mixed_lengths(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "mixed.jsonl", [_words(n) for n in LENGTHS])


def test_truncate_keeps_every_prompt(fake: FakeBackend, mixed_lengths: Path) -> None:
    case = _case(prompts=str(mixed_lengths), num_prompts=5, max_input_tokens=6)
    got = build_prompt_set(case, fake)
    assert _texts(got) == [_words(n) for n in LENGTHS]
    assert got.input_lengths == [3, 6, 4, 6, 5]
    assert (got.overflow, got.truncated, got.filtered) == ("truncate", 2, 0)
    params = GenerateParams.from_case(case)
    assert [g.input_tokens for g in fake.generate(got.requests, params=params)] == [3, 6, 4, 6, 5]


def test_filter_drops_long_prompts_and_draws_further(
    fake: FakeBackend, mixed_lengths: Path
) -> None:
    case = _case(
        prompts=str(mixed_lengths), num_prompts=5, max_input_tokens=6, prompt_overflow="filter"
    )
    got = build_prompt_set(case, fake)
    # Drawn in order, cycling: 3, (10), 4, (12), 5, 3, (10), 4.
    assert got.input_lengths == [3, 4, 5, 3, 4]
    assert _texts(got) == [_words(n) for n in [3, 4, 5, 3, 4]]
    assert (got.overflow, got.truncated, got.filtered) == ("filter", 0, 3)
    assert any("filtered out 3" in note for note in got.notes)


def test_filter_reads_ahead_of_a_long_source(fake: FakeBackend, tmp_path: Path) -> None:
    lengths = [20 if i % 3 else 2 for i in range(300)]  # one in three fits
    path = _jsonl(tmp_path / "long.jsonl", [_words(n) for n in lengths])
    case = _case(prompts=str(path), num_prompts=20, max_input_tokens=6, prompt_overflow="filter")
    got = build_prompt_set(case, fake)
    assert got.input_lengths == [2] * 20
    assert got.filtered == 38  # up to the 20th fitting prompt, at position 57
    assert sum(fake.count_calls) < len(lengths)  # it did not count the whole source
    assert not any("repeated" in note for note in got.notes)


def test_filter_with_nothing_fitting_is_an_error(fake: FakeBackend, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "long.jsonl", [_words(9), _words(8)])
    case = _case(prompts=str(path), max_input_tokens=4, prompt_overflow="filter")
    with pytest.raises(ConfigurationError, match=r"no prompt fits: all 2 prompts .* max_input"):
        build_prompt_set(case, fake)


# -- ShareGPT conversation files -----------------------------------------------------------------


def test_sharegpt_conversations_shape(fake: FakeBackend, tmp_path: Path) -> None:
    path = _json(
        tmp_path / "chats.json",
        [
            {
                "id": "a",
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "first question"},
                    {"from": "gpt", "value": "an answer"},
                    {"from": "human", "value": "a follow-up"},
                ],
            },
            {"id": "b", "conversations": [{"from": "gpt", "value": "no user turn"}]},
            {"id": "c", "conversations": [{"from": "user", "value": "second question"}]},
        ],
    )
    got = build_prompt_set(_case(prompts=str(path), num_prompts=3), fake)
    assert _texts(got) == ["first question", "second question", "first question"]
    assert got.input_lengths == [2, 2, 2]
    assert any("skipped 1" in note for note in got.notes)


def test_sharegpt_messages_shape(fake: FakeBackend, tmp_path: Path) -> None:
    path = _json(
        tmp_path / "messages.json",
        [
            {
                "messages": [
                    {"role": "system", "content": "You help."},
                    {"role": "user", "content": "plain content"},
                    {"role": "assistant", "content": "ok"},
                ]
            },
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "in parts"}]}]},
        ],
    )
    got = build_prompt_set(_case(prompts=str(path), num_prompts=2), fake)
    assert _texts(got) == ["plain content", "in parts"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('[{"conversations": []}\n{"x": 1}]', r"line 2 column 1: not valid JSON"),
        ('{"conversations": []}', "expected a JSON list of conversations"),
        ("[]", "holds no conversations"),
        ('[{"conversations": []}, "text"]', r"conversation 1: expected an object, got a string"),
        ('[{"id": 7, "turns": []}]', r'conversation 0 \(id 7\): expected a "conversations"'),
        ('[{"conversations": {"from": "human"}}]', "expected a list of turns, got an object"),
        ('[{"conversations": [{"value": "hi"}]}]', r'turn 0: expected a string "from"'),
        ('[{"messages": [{"role": "user", "content": ""}]}]', "needs a non-empty string"),
        ('[{"conversations": [{"from": "gpt", "value": "x"}]}]', "holds no prompts"),
    ],
)
def test_sharegpt_errors(fake: FakeBackend, tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigurationError, match=match) as caught:
        build_prompt_set(_case(prompts=str(path)), fake)
    if "holds no prompts" not in match:
        assert str(path) in str(caught.value)


def test_sharegpt_missing_file(fake: FakeBackend, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"existing \.json conversation file"):
        build_prompt_set(_case(prompts=str(tmp_path / "absent.json")), fake)


# -- Hugging Face datasets -----------------------------------------------------------------------


def test_hf_without_datasets_says_how_to_install(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes the import fail
    with pytest.raises(ConfigurationError, match=r"pip install 'pytest-llem\[datasets\]'"):
        build_prompt_set(_case(prompts="hf:org/name"), fake)


@pytest.fixture
def datasets_module() -> Iterator[Any]:
    datasets = pytest.importorskip("datasets", reason=DATASETS_INSTALL_HINT)
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    yield datasets
    if not was_disabled:
        datasets.enable_progress_bars()


@NEEDS_DATASETS
def test_hf_dataset_saved_to_disk(fake: FakeBackend, tmp_path: Path, datasets_module: Any) -> None:
    rows = {"question": ["q one", None, "q two words", "q three more words"], "id": [1, 2, 3, 4]}
    path = tmp_path / "saved"
    datasets_module.Dataset.from_dict(rows).save_to_disk(str(path))
    got = build_prompt_set(_case(prompts=f"hf:{path}", num_prompts=4), fake)
    assert _texts(got) == ["q one", "q two words", "q three more words", "q one"]
    assert got.input_lengths == [2, 3, 4, 2]
    assert got.source == f"hf:{path}"
    assert any("column 'question'" in note and "4 rows" in note for note in got.notes)
    assert any("skipped 1" in note for note in got.notes)
    with pytest.raises(ConfigurationError, match=r"no column 'body'.*question, id"):
        build_prompt_set(_case(prompts=f"hf:{path}", prompt_column="body"), fake)
    with pytest.raises(ConfigurationError, match="not text or a conversation"):
        build_prompt_set(_case(prompts=f"hf:{path}", prompt_column="id"), fake)


@NEEDS_DATASETS
def test_hf_dataset_dict_split_and_conversations(
    fake: FakeBackend, tmp_path: Path, datasets_module: Any
) -> None:
    chats = [
        [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi"}],
        [{"from": "system", "value": "x"}, {"from": "human", "value": "second one here"}],
    ]
    train = datasets_module.Dataset.from_dict({"conversations": chats, "label": ["a", "b"]})
    test = datasets_module.Dataset.from_dict({"conversations": chats[:1], "label": ["c"]})
    path = tmp_path / "saved-dict"
    datasets_module.DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    got = build_prompt_set(_case(prompts=f"hf:{path}", num_prompts=2), fake)
    assert _texts(got) == ["hello there", "second one here"]
    got = build_prompt_set(_case(prompts=f"hf:{path}", num_prompts=2, prompt_split="test"), fake)
    assert _texts(got) == ["hello there", "hello there"]
    got = build_prompt_set(_case(prompts=f"hf:{path}", prompt_column="label"), fake)
    assert _texts(got)[:2] == ["a", "b"]
    with pytest.raises(ConfigurationError, match=r"no split 'validation'.*train, test"):
        build_prompt_set(_case(prompts=f"hf:{path}", prompt_split="validation"), fake)


@NEEDS_DATASETS
def test_hf_dataset_without_a_known_column(
    fake: FakeBackend, tmp_path: Path, datasets_module: Any
) -> None:
    path = tmp_path / "saved"
    datasets_module.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(path))
    with pytest.raises(ConfigurationError, match=r"none of the columns .* one of: body"):
        build_prompt_set(_case(prompts=f"hf:{path}"), fake)
    not_a_dataset = tmp_path / "plain"
    not_a_dataset.mkdir()
    with pytest.raises(ConfigurationError, match="cannot load the dataset saved at"):
        build_prompt_set(_case(prompts=f"hf:{not_a_dataset}"), fake)


# -- the transformers backend with llem-tiny -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> Iterator[Any]:
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from pytest_llem.backends.transformers import TransformersBackend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_transformers_backend.py
    backend = TransformersBackend(CaseConfig(model=str(tiny_model), device="cpu"))
    backend.load()
    yield backend
    backend.close()
    torch.set_num_threads(threads)


def test_tiny_vocabulary(tiny: Any) -> None:
    assert tiny.vocabulary() == Vocabulary(size=1024, special_ids=frozenset({0, 1, 2}))


def test_tiny_count_tokens_matches_generate(tiny: Any) -> None:
    texts = ["Hi", "", "What is the capital of France?", " ".join(["word"] * 60)]
    counts = tiny.count_tokens(texts)
    assert counts[1] == 1  # an empty prompt is just BOS
    requests = [Request(i, text) for i, text in enumerate(texts)]
    out = tiny.generate(requests, params=GenerateParams(max_new_tokens=1, max_input_tokens=None))
    assert [g.input_tokens for g in out] == counts
    assert tiny.count_tokens([]) == []


def test_tiny_prompt_set_lengths_match_generate(tiny: Any) -> None:
    case = CaseConfig(model="unused", num_prompts=12, max_input_tokens=16)
    got = build_prompt_set(case, tiny)
    assert got.truncated > 0
    assert max(got.input_lengths) == 16
    out = tiny.generate(got.requests, params=GenerateParams(max_new_tokens=1, max_input_tokens=16))
    assert [g.input_tokens for g in out] == got.input_lengths


def test_tiny_generates_synthetic_prompts_of_exact_length(tiny: Any) -> None:
    case = CaseConfig(model="unused", prompts="synthetic", input_tokens=24, num_prompts=3)
    got = build_prompt_set(case, tiny)
    mixed = [*got.requests, Request(3, "a text prompt in the same batch")]
    params = GenerateParams(max_new_tokens=3, min_new_tokens=3, max_input_tokens=512)
    out = tiny.generate(mixed, params=params)
    assert [g.input_tokens for g in out[:3]] == [24, 24, 24] == got.input_lengths
    assert out[3].input_tokens == tiny.count_tokens([mixed[3].prompt])[0]
    assert all(g.output_tokens == 3 for g in out)
    truncated = tiny.generate(
        got.requests, params=GenerateParams(max_new_tokens=1, max_input_tokens=10)
    )
    assert [g.input_tokens for g in truncated] == [10, 10, 10]


def test_tiny_token_ids_are_the_prompt(tiny: Any) -> None:
    text = "Write a haiku about rain on a tin roof."
    ids = tuple(tiny._tokenizer(text)["input_ids"])
    params = GenerateParams(max_new_tokens=6, min_new_tokens=6)
    by_text, by_ids = tiny.generate(
        [Request(0, text), Request(1, "<ids>", token_ids=ids)], params=params
    )
    assert by_ids.input_tokens == by_text.input_tokens == len(ids)
    assert by_ids.output_token_ids == by_text.output_token_ids


def test_tiny_rejects_bad_token_ids(tiny: Any) -> None:
    params = GenerateParams(max_new_tokens=1)
    with pytest.raises(BackendInferenceError, match="outside the vocabulary"):
        tiny.generate([Request(0, "x", token_ids=(5, 1024))], params=params)
    with pytest.raises(BackendInferenceError, match="empty token_ids"):
        tiny.generate([Request(0, "x", token_ids=())], params=params)


def test_count_tokens_and_vocabulary_need_load(tiny_model: Path) -> None:
    pytest.importorskip("transformers")
    from pytest_llem.backends.transformers import TransformersBackend

    unloaded = TransformersBackend(CaseConfig(model=str(tiny_model), device="cpu"))
    with pytest.raises(BackendInferenceError, match="before load"):
        unloaded.count_tokens(["x"])
    with pytest.raises(BackendInferenceError, match="before load"):
        unloaded.vocabulary()
    fake = FakeBackend(FakeClock())
    with pytest.raises(BackendInferenceError, match="before load"):
        fake.count_tokens(["x"])
