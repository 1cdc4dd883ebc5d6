"""What every config model shares: strict validation, and the field metadata introspection reads.

``field_meta`` builds a field's ``json_schema_extra``: whether changing it needs a new model load
(``load``), the values a sweep takes for ``"auto"`` (``sweep``), and its short name in test ids
(``id``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel", "field_meta"]


def field_meta(
    *, load: bool = False, sweep: list[Any] | None = None, short: str | None = None
) -> dict[str, Any]:
    """A field's ``json_schema_extra``: load-relevance, sweep values and short id name."""
    meta: dict[str, Any] = {}
    if load:
        meta["load"] = True
    if sweep is not None:
        meta["sweep"] = sweep
    if short is not None:
        meta["id"] = short
    return meta


class StrictModel(BaseModel):
    """Base of the user-facing configs: unknown fields are errors, defaults are validated, and
    a config never changes once built."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)
