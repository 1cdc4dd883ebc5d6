"""Shards of one session: the pure assignment (groups whole, every case once, the same in every
process, balanced within its bound) and the option's parser."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_llem.exceptions import ConfigurationError
from pytest_llem.sharding import (
    Group,
    ShardSpec,
    assign_groups,
    assignment_digest,
    calibration,
    collection_digest,
    estimate_case_cost,
    parse_shard,
    shard_of,
)

REPO = Path(__file__).resolve().parents[1]


def _groups(costs: list[float], per_group: int = 3) -> list[Group]:
    return [
        Group(
            key=f"model-{i:02d}",
            ids=tuple(f"test_m.py::test_{i}[{j}]" for j in range(per_group)),
            cost=cost,
        )
        for i, cost in enumerate(costs)
    ]


SKEWED = [100.0, 90.0, 7.0, 7.0, 6.0, 5.0, 5.0, 4.0, 3.0, 3.0, 2.0, 1.0, 1.0, 1.0, 0.5]


def test_parse_shard_accepts_k_of_n_and_refuses_the_rest() -> None:
    assert parse_shard("2/3") == ShardSpec(2, 3)
    assert parse_shard(" 1 / 1 ") == ShardSpec(1, 1)
    assert str(ShardSpec(3, 8)) == "3/8"
    for bad in ("0/3", "4/3", "1/0", "x", "", "1/", "/3", "-1/3", "1.5/3", "1/3/4"):
        with pytest.raises(ConfigurationError, match="expected K/N with 1 <= K <= N"):
            parse_shard(bad)


@pytest.mark.parametrize("count", range(1, 9))
def test_every_case_in_exactly_one_shard_and_groups_whole(count: int) -> None:
    groups = _groups(SKEWED)
    shards = assign_groups(groups, count)
    assert len(shards) == count
    placed = [case for shard in shards for group in shard for case in group.ids]
    every = [case for group in groups for case in group.ids]
    assert sorted(placed) == sorted(every)  # each once, none lost
    owner = shard_of(shards)
    for group in groups:
        assert len({owner[case] for case in group.ids}) == 1  # never split


def _best_max(costs: list[float], count: int) -> float:
    """The optimal makespan, by trying every assignment (small sets only)."""
    best = float("inf")
    for choice in itertools.product(range(count), repeat=len(costs)):
        loads = [0.0] * count
        for cost, k in zip(costs, choice, strict=True):
            loads[k] += cost
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("count", [2, 3])
def test_a_skewed_set_is_balanced_within_the_stated_bounds(count: int) -> None:
    costs = [50.0, 31.0, 29.0, 20.0, 12.0, 9.0, 4.0, 1.0]
    shards = assign_groups(_groups(costs), count)
    loads = [sum(g.cost for g in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(costs)
    assert max(loads) <= 4 / 3 * _best_max(costs, count) + 1e-9


@pytest.mark.parametrize("count", range(2, 9))
def test_max_minus_min_is_at_most_the_largest_group(count: int) -> None:
    shards = assign_groups(_groups(SKEWED), count)
    loads = [sum(g.cost for g in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(SKEWED)


def test_the_assignment_ignores_the_input_order() -> None:
    groups = _groups(SKEWED)
    one = assignment_digest(assign_groups(groups, 3))
    assert assignment_digest(assign_groups(list(reversed(groups)), 3)) == one
    assert assignment_digest(assign_groups(groups, 4)) != one


def test_digests_name_the_collection_and_the_assignment() -> None:
    assert collection_digest(["b", "a"]) == collection_digest(["a", "b"])
    assert collection_digest(["a", "b"]) != collection_digest(["a", "c"])


_SCRIPT = """
import json, sys
from pytest_llem.sharding import Group, assign_groups, assignment_digest
groups = [Group(f"k{i}", (f"id{i}a", f"id{i}b"), float(c)) for i, c in enumerate(json.loads(sys.argv[1]))]
shards = assign_groups(groups, 3)
print(json.dumps([assignment_digest(shards), [[g.key for g in s] for s in shards]]))
"""


def test_the_same_assignment_in_processes_with_other_hash_seeds() -> None:
    # Equal costs everywhere: only the tie-breaking order decides, where hash order would show.
    costs = json.dumps([5, 5, 5, 5, 5, 5, 1, 1])
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, costs],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_estimates_and_their_calibration_to_seconds() -> None:
    small = estimate_case_cost(requests=2, max_new_tokens=4, repeat=1, warmup=1, duration_s=None)
    assert small == 16.0
    timed = estimate_case_cost(requests=2, max_new_tokens=4, repeat=2, warmup=0, duration_s=3.0)
    assert timed == 6000.0
    # the case with history took 2 s for 16 units: 0.125 s per unit
    assert calibration({"a": 16.0, "b": 32.0}, {"a": 2.0}) == pytest.approx(0.125)
    assert calibration({"a": 16.0}, {}) == 1.0


def test_the_command_line_wins_over_the_environment_over_the_ini() -> None:
    from pytest_llem.options import build_options

    def shard(cli: dict[str, str], env: dict[str, str]) -> tuple[object, str]:
        options = build_options(cli=cli, ini={"shard": "1/4"}, environ=env, invocation_dir=Path())
        return options.shard, options.origin("shard")

    assert shard({}, {}) == (ShardSpec(1, 4), "ini option llem_shard")
    assert shard({}, {"LLEM_SHARD": "2/4"}) == (
        ShardSpec(2, 4),
        "environment variable LLEM_SHARD",
    )
    assert shard({"shard": "3/4"}, {"LLEM_SHARD": "2/4"}) == (ShardSpec(3, 4), "--llem-shard")
    with pytest.raises(ConfigurationError, match="environment variable LLEM_SHARD: expected K/N"):
        shard({}, {"LLEM_SHARD": "0/4"})
