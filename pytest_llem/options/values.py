"""Each option's value from each source, parsed by its row of the option table, and the rule
that picks one: the command line over the environment (for the rows that name a variable, such
as ``LLEM_SHARD``) over the ini file over the row's default."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pytest

from pytest_llem.options.table import OPTIONS, Option

__all__ = ["Chosen", "OptionValues"]

T = TypeVar("T")


@dataclass(frozen=True)
class Chosen(Generic[T]):
    """The value that won for one option and how a message names where it came from."""

    value: T | None
    origin: str
    from_command_line: bool = False


def _given(value: Any) -> bool:
    """Whether a source gave a value: not None, not an unset flag, not empty; 0 is a value."""
    if value is None or value is False:
        return False
    return not (isinstance(value, str | list | tuple) and len(value) == 0)


class OptionValues:
    """The parsed values of every option, as the command line, the environment and the ini
    file give them."""

    def __init__(
        self,
        cli: Mapping[str, Any],
        ini: Mapping[str, Any],
        env: Mapping[str, Any] | None = None,
    ) -> None:
        """Keep values already parsed, by option name (absent or None: not given)."""
        self._cli = dict(cli)
        self._ini = dict(ini)
        self._env = dict(env or {})

    @classmethod
    def from_config(cls, config: pytest.Config) -> OptionValues:
        """The command line's values (argparse parsed them) and the ini file's (parsed here).

        Raises:
            ConfigurationError: an ini value its parser refuses, naming the ini key.
        """
        cli = {row.name: getattr(config.option, row.dest, None) for row in OPTIONS}
        ini: dict[str, Any] = {}
        for row in OPTIONS:
            if row.ini_key is not None:
                ini[row.name] = _read(row, config.getini(row.ini_key), row.ini_origin)
        return cls(cli, ini, _environment(os.environ))

    @classmethod
    def from_text(
        cls,
        cli: Mapping[str, Any],
        ini: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
    ) -> OptionValues:
        """Values as a user writes them, by option name: a string, a list of lines for a
        repeatable option, a bool for a flag; ``environ`` holds environment variables by name.

        Raises:
            ConfigurationError: a value its parser refuses, naming the flag or ini key.
        """
        parsed_cli = {row.name: _read(row, cli.get(row.name), row.flag) for row in OPTIONS}
        parsed_ini = {
            row.name: _read(row, ini.get(row.name), row.ini_origin)
            for row in OPTIONS
            if row.ini_key is not None
        }
        return cls(parsed_cli, parsed_ini, _environment(environ or {}))

    def cli(self, option: Option[T]) -> T | None:
        """The command line's value of ``option``; None when not given there."""
        value = self._cli.get(option.name)
        return value if _given(value) or value == "" else None

    def ini(self, option: Option[T]) -> T | None:
        """The ini file's value of ``option``; None when not given there."""
        value = self._ini.get(option.name)
        return value if _given(value) else None

    def env(self, option: Option[T]) -> T | None:
        """The environment's value of ``option``; None when not given there."""
        value = self._env.get(option.name)
        return value if _given(value) else None

    def lines(self, option: Option[T], *, ini: bool = False) -> tuple[T, ...]:
        """The lines of a repeatable option from the command line (or the ini file)."""
        found = (self._ini if ini else self._cli).get(option.name) or ()
        return tuple(found)

    def flag(self, option: Option[Any]) -> bool:
        """Whether a command-line flag was given."""
        return bool(self._cli.get(option.name))

    def chosen(self, option: Option[T]) -> Chosen[T]:
        """The winning value: the command line's, else the environment's, else the ini
        file's, else the default."""
        value = self.cli(option)
        if value is not None:
            return Chosen(value, option.flag, from_command_line=True)
        value = self.env(option)
        if value is not None:
            return Chosen(value, option.env_origin)
        value = self.ini(option)
        if value is not None:
            return Chosen(value, option.ini_origin)
        return Chosen(option.default, f"the default of {option.flag}")

    def get(self, option: Option[T]) -> T | None:
        """The winning value of ``option`` (see :meth:`chosen`)."""
        return self.chosen(option).value

    def shown(self, *, ini: bool = False) -> dict[str, Any]:
        """What the run record keeps of one source: each option given there, as text."""
        found = self._ini if ini else self._cli
        shown: dict[str, Any] = {}
        for row in OPTIONS:
            value = found.get(row.name)
            if not _given(value):
                continue
            if isinstance(value, list):
                shown[row.name] = [row.show(line) for line in value]
            else:
                shown[row.name] = row.show(value)
        return shown


def _environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The values the environment gives for the rows that name a variable, parsed.

    Raises:
        ConfigurationError: a value its parser refuses, naming the variable.
    """
    found: dict[str, Any] = {}
    for row in OPTIONS:
        if row.env is not None and row.env in environ:
            found[row.name] = _read(row, environ[row.env], row.env_origin)
    return found


def _read(row: Option[Any], raw: Any, origin: str) -> Any:
    """One source's raw value of ``row``, parsed (None or blank: not given)."""
    if raw is None:
        return [] if row.form == "lines" else None
    if row.form == "flag":
        return bool(raw)
    if row.form == "lines":
        lines: Iterable[str] = [raw] if isinstance(raw, str) else raw
        return [row.read(line, origin) for line in lines if line.strip()]
    return row.read(str(raw), origin)
