"""The plugin's options: one table of ``--llem-*`` flags and ``llem_*`` ini keys
(:mod:`~pytest_llem.options.table`), the parsers of their values
(:mod:`~pytest_llem.options.parsers`), the values each source gives
(:mod:`~pytest_llem.options.values`) and the frozen model they build
(:mod:`~pytest_llem.options.model`, :mod:`~pytest_llem.options.build`).

A new option is one row in ``table.OPTIONS`` (and, where the session reads it, one field of the
model); its flag, ini key, parser, ``--help`` line and the tests over the table follow.
"""

from __future__ import annotations

from pytest_llem.options.build import (
    OPTION_PATHS,
    build_options,
    load_compare_baseline,
    options_from_config,
    options_from_values,
)
from pytest_llem.options.model import (
    DEFAULT_REPORT_DIR,
    CompareBaseline,
    CooldownSpec,
    EnergyOptions,
    LlemOptions,
    StoreOptions,
)
from pytest_llem.options.table import OPTIONS, Option, add_options, option
from pytest_llem.options.values import Chosen, OptionValues

__all__ = [
    "DEFAULT_REPORT_DIR",
    "OPTIONS",
    "OPTION_PATHS",
    "Chosen",
    "CompareBaseline",
    "CooldownSpec",
    "EnergyOptions",
    "LlemOptions",
    "Option",
    "OptionValues",
    "StoreOptions",
    "add_options",
    "build_options",
    "load_compare_baseline",
    "option",
    "options_from_config",
    "options_from_values",
]
