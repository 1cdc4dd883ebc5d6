"""Shards of one session (``--llem-shard=K/N``): whole model-load groups assigned to N shards,
balanced by expected cost, the same on every node.

Pure functions, no pytest: the collection hook (``shard_session``) hands in each group's case
ids and cost, and gets back which group runs where. Everything is ordered by stable keys (the
group's key, then its ids), never by set or dict iteration of unordered data, so every node and
every xdist worker computes the same assignment from the same collection whatever its
``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pytest_llem.exceptions import ConfigurationError

__all__ = [
    "LOAD_ESTIMATE",
    "Group",
    "ShardSpec",
    "assign_groups",
    "assignment_digest",
    "calibration",
    "collection_digest",
    "estimate_case_cost",
    "parse_shard",
    "shard_of",
]

#: What loading a model counts as in estimate units (generated tokens), per load group.
LOAD_ESTIMATE = 1000.0

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``count`` (both counted from 1): ``K/N``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> ShardSpec:
    """``K/N`` with ``1 <= K <= N``.

    Raises:
        ConfigurationError: anything else, saying what is expected.
    """
    match = _SPEC.match(text)
    expected = f"expected K/N with 1 <= K <= N (e.g. 2/3), got {text.strip()!r}"
    if match is None:
        raise ConfigurationError(expected)
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count:
        raise ConfigurationError(expected)
    return ShardSpec(index, count)


@dataclass(frozen=True)
class Group:
    """A model-load group (never split across shards): its stable key, case ids and cost."""

    key: str
    ids: tuple[str, ...]
    cost: float


def assign_groups(groups: Sequence[Group], count: int) -> list[list[Group]]:
    """Assign every group to one of ``count`` shards, balancing the summed cost.

    Greedy longest-first (LPT): groups by falling cost (ties by key), each to the shard with
    the least cost so far (ties to the lowest index). Its maximum is at most 4/3 of the best
    possible, and max - min <= the largest group's cost.

    Returns:
        One list of groups per shard, shard 1 first, each in the order it was filled.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    ordered = sorted(groups, key=lambda g: (-g.cost, g.key, g.ids))
    shards: list[list[Group]] = [[] for _ in range(count)]
    heap = [(0.0, index) for index in range(count)]
    for group in ordered:
        load, index = heapq.heappop(heap)
        shards[index].append(group)
        heapq.heappush(heap, (load + group.cost, index))
    return shards


def shard_of(shards: Sequence[Sequence[Group]]) -> dict[str, int]:
    """Case id -> shard number (from 1) of an assignment."""
    return {case: k for k, shard in enumerate(shards, start=1) for g in shard for case in g.ids}


def _digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def collection_digest(ids: Iterable[str]) -> str:
    """SHA-256 of every llem case id of the session, sorted, one per line."""
    return _digest(sorted(ids))


def assignment_digest(shards: Sequence[Sequence[Group]]) -> str:
    """SHA-256 of ``shard<TAB>case id`` for every case, sorted: equal on two nodes only when
    they assigned every case to the same shard."""
    owner = shard_of(shards)
    return _digest(sorted(f"{k}\t{case}" for case, k in owner.items()))


def estimate_case_cost(
    *, requests: int, max_new_tokens: int, repeat: int, warmup: int, duration_s: float | None
) -> float:
    """A case's expected cost without history, in generated tokens: requests x max_new_tokens
    x (repeat + warmup). A time-boxed case (``traffic.duration_s``) counts its seconds at
    1,000 tokens/s."""
    windows = repeat + warmup
    if duration_s is not None:
        return duration_s * 1000.0 * windows
    return float(requests * max_new_tokens * windows)


def calibration(estimates: Mapping[str, float], measured: Mapping[str, float]) -> float:
    """Seconds per estimate unit: the measured seconds of the cases that have both, over their
    estimates (1.0 without such cases: the estimates alone then balance the shards)."""
    both = sorted(case for case in estimates if case in measured)
    estimated = sum(estimates[case] for case in both)
    if not both or estimated <= 0:
        return 1.0
    return sum(measured[case] for case in both) / estimated
