"""Workload profiles: one suite, sized from a CPU smoke test to a GPU benchmark.

A run has one profile (``--llem-profile``: ``smoke``, ``standard`` or ``full``). A marker value
written as ``by_profile(smoke=..., standard=..., full=...)`` takes the value of the run's
profile when the test is collected, so the same test functions run a small workload on a laptop
and a realistic one on a GPU. A profile left out takes the value of the next smaller one given
(``full`` falls back to ``standard``, ``standard`` to ``smoke``). Values that set a sweep axis
work the same way; ids name only the values that ran, so a case whose swept values are the same
in two profiles has the same id in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["PROFILES", "ByProfile", "Profile", "by_profile", "resolve_profile_values"]

Profile = Literal["smoke", "standard", "full"]

#: The profiles, smallest first.
PROFILES: tuple[Profile, ...] = ("smoke", "standard", "full")


@dataclass(frozen=True)
class ByProfile:
    """A marker value that depends on the run's profile (build it with :func:`by_profile`)."""

    values: tuple[tuple[Profile, Any], ...]

    def pick(self, profile: str) -> Any:
        """The value for ``profile``: its own, else the next smaller profile's."""
        given = dict(self.values)
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from: {', '.join(PROFILES)}")
        for name in reversed(PROFILES[: PROFILES.index(profile) + 1]):
            if name in given:
                return given[name]
        raise AssertionError("by_profile always has a smoke value")  # pragma: no cover

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in self.values)
        return f"by_profile({inner})"


def by_profile(*, smoke: Any, standard: Any = None, full: Any = None) -> ByProfile:
    """A marker value per profile: ``batch_size=by_profile(smoke=[1, 4], standard=[8, 64])``.

    Args:
        smoke: The value of the smoke profile (required: every suite must run on a CPU).
        standard: The standard profile's value (default: the smoke value).
        full: The full profile's value (default: the standard value).
    """
    given: list[tuple[Profile, Any]] = [("smoke", smoke)]
    if standard is not None:
        given.append(("standard", standard))
    if full is not None:
        given.append(("full", full))
    return ByProfile(tuple(given))


def resolve_profile_values(value: Any, profile: str) -> Any:
    """``value`` with every :class:`ByProfile` in it (nested in dicts and lists too) replaced
    by the value for ``profile``."""
    if isinstance(value, ByProfile):
        return resolve_profile_values(value.pick(profile), profile)
    if isinstance(value, Mapping):
        return {key: resolve_profile_values(item, profile) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(resolve_profile_values(item, profile) for item in value)
    return value
