"""The energy meter names a user can write (``--llem-meter``, ``llem_meter``) and how a list
of them is checked.

Here rather than in :mod:`pytest_llem.meters.registry` (which re-exports both) so the options
are validated without loading a meter.
"""

from __future__ import annotations

from collections.abc import Sequence

from pytest_llem.exceptions import ConfigurationError

__all__ = ["METER_CHOICES", "parse_meter_list"]

#: Every value ``--llem-meter`` accepts (several concrete meters may be joined with commas).
METER_CHOICES: tuple[str, ...] = ("auto", "nvml", "rapl", "zeus", "codecarbon", "none")

_ALONE = ("auto", "none")


def parse_meter_list(text: str, known: Sequence[str] = METER_CHOICES) -> tuple[str, ...]:
    """Split ``--llem-meter``'s value into meter names and check them.

    Args:
        text: One name or several joined with commas (``nvml,rapl``).
        known: Every accepted name (plugins may add their own).

    Returns:
        The names, in the order given.

    Raises:
        ConfigurationError: An unknown or repeated name, or ``auto``/``none`` combined with
            another meter.
    """
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not names:
        raise ConfigurationError(f"no meter named; choose from: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise ConfigurationError(
                f"unknown meter {name!r}; choose from: {', '.join(known)} "
                "(several with commas, e.g. nvml,rapl)"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigurationError(f"meter {repeated[0]!r} is named twice")
    alone = [n for n in names if n in _ALONE]
    if alone and len(names) > 1:
        raise ConfigurationError(f"{alone[0]!r} cannot be combined with other meters")
    return names
