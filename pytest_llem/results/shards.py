"""Whether the run records of a sharded session (``--llem-shard=K/N``) make the whole session:
every shard once, of one collection and one commit, no case twice.

``llem merge`` runs :func:`check_shards` before merging; a record without a shard manifest is
merged as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.results.models import PartialRecord, RunRecord, ShardManifest

__all__ = ["ShardCheck", "check_shards", "partial_note"]


@dataclass(frozen=True)
class ShardCheck:
    """The shards found, in shard order, and what is missing (None: the session is whole)."""

    shards: list[ShardManifest]
    partial: PartialRecord | None


def _missing_text(missing: Sequence[str]) -> str:
    if len(missing) == 1:
        return f"shard {missing[0]} missing"
    return f"shards {', '.join(missing)} missing"


def partial_note(partial: PartialRecord) -> str:
    """One line saying what a partial merged record lacks."""
    return (
        f"partial record: {_missing_text(partial.missing_shards)} "
        f"({partial.present_cases} of {partial.expected_cases} llem cases assigned to the "
        "merged shards)"
    )


def _same_session(found: list[tuple[str, ShardManifest]]) -> None:
    """Every shard of one session: same N, collection, commit and assignment."""
    first_label, first = found[0]
    for label, shard in found[1:]:
        name = f"shard {shard.label} ({label})"
        other = f"shard {first.label} ({first_label})"
        if shard.count != first.count:
            raise ResultStoreError(f"{name} and {other} split the session differently")
        if shard.collection_digest != first.collection_digest:
            raise ResultStoreError(
                f"{name} collected other cases than {other} (collection digests differ)"
            )
        if shard.commit != first.commit:
            raise ResultStoreError(
                f"{name} ran commit {shard.commit or 'unknown'}, {other} ran "
                f"{first.commit or 'unknown'}"
            )
        if shard.assignment_digest != first.assignment_digest:
            raise ResultStoreError(
                f"{name} assigned the cases differently from {other} (they balanced by "
                "different saved runs: point --llem-storage at one shared folder)"
            )


def _no_case_twice(found: list[tuple[str, ShardManifest]], records: Sequence[RunRecord]) -> None:
    seen: dict[str, str] = {}
    for (_, shard), record in zip(found, records, strict=True):
        for case_id in {*shard.ids, *(case.id for case in record.cases)}:
            if case_id in seen and seen[case_id] != shard.label:
                raise ResultStoreError(
                    f"case {case_id} is in shard {seen[case_id]} and shard {shard.label}"
                )
            seen[case_id] = shard.label


def check_shards(
    records: Sequence[RunRecord], labels: Sequence[str], *, allow_partial: bool = False
) -> ShardCheck | None:
    """Check that the records are the shards of one session, each once, all present.

    Args:
        records: The records to merge.
        labels: How messages name each record (its file).
        allow_partial: Accept missing shards and say so in the result instead of failing.

    Returns:
        None when no record is a shard; else the shards and what is missing.

    Raises:
        ResultStoreError: a record is not a shard while others are, shards of different
            sessions (count, collection, commit, assignment), a shard given twice, a case in
            two shards, or (without ``allow_partial``) a missing shard: ``shard 2/3 missing``.
    """
    if not any(record.shard is not None for record in records):
        return None
    found: list[tuple[str, ShardManifest]] = []
    for record, label in zip(records, labels, strict=True):
        if record.shard is None:
            raise ResultStoreError(
                f"{label} is not a shard (no shard manifest) but other records are: merge the "
                "shards of one session first, then merge that record with the others"
            )
        found.append((label, record.shard))
    _same_session(found)
    by_index: dict[int, str] = {}
    for label, shard in found:
        if shard.index in by_index:
            raise ResultStoreError(
                f"shard {shard.label} given twice ({by_index[shard.index]}, {label})"
            )
        by_index[shard.index] = label
    _no_case_twice(found, records)
    count = found[0][1].count
    missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in by_index]
    shards = sorted((shard for _, shard in found), key=lambda shard: shard.index)
    expected = shards[0].collection_size
    present = sum(len(shard.ids) for shard in shards)
    if missing and not allow_partial:
        raise ResultStoreError(
            f"{_missing_text(missing)}: merge every shard, or pass --allow-partial"
        )
    if not missing and present != expected:
        raise ResultStoreError(
            f"the shards hold {present} llem cases but the session collected {expected}"
        )
    partial = (
        PartialRecord(missing_shards=missing, expected_cases=expected, present_cases=present)
        if missing
        else None
    )
    return ShardCheck(shards=shards, partial=partial)
