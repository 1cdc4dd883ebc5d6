"""The plugin's options once parsed and checked: one frozen Pydantic model (:class:`LlemOptions`)
with its energy and run-store parts.

Built by :mod:`pytest_llem.options.build` from the option table
(:mod:`pytest_llem.options.table`); read by the session, the collection hooks, the fixture and
the end-of-run code, and handed to the ``pytest_llem_make_backend`` / ``pytest_llem_make_meter``
hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pytest_llem.config.meter_names import METER_CHOICES
from pytest_llem.config.models import BUILTIN_BACKENDS
from pytest_llem.results.adaptive import DEFAULT_MAX_REPEAT, DEFAULT_TARGET_CI, AdaptivePlan
from pytest_llem.results.drift import DEFAULT_DRIFT_MARGIN, DriftMargin
from pytest_llem.results.models import ProfileRecord, RunRecord
from pytest_llem.sharding import ShardSpec

__all__ = [
    "DEFAULT_BASELINE_S",
    "DEFAULT_MAX_REPEAT",
    "DEFAULT_MIN_WINDOW_S",
    "DEFAULT_REPORT_DIR",
    "DEFAULT_STORAGE",
    "DEFAULT_TARGET_CI",
    "MAX_SECONDS",
    "CompareBaseline",
    "CooldownSpec",
    "EnergyOptions",
    "LlemOptions",
    "StoreOptions",
]

DEFAULT_REPORT_DIR = "reports"
#: Storage folder when neither ``--llem-storage`` nor the ini key is given.
DEFAULT_STORAGE = ".llem"
#: The longest any seconds option may be (a week).
MAX_SECONDS = 7 * 24 * 3600.0
#: Default length of the idle baseline, seconds (``--llem-baseline-s``).
DEFAULT_BASELINE_S = 5.0
#: Default shortest measurement window, seconds (``--llem-min-window-s``): none of its own, so
#: the meters' resolution (20 update periods) alone decides how long a window must last.
DEFAULT_MIN_WINDOW_S = 0.0


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class CooldownSpec(_Frozen):
    """``--llem-cooldown``: ``off``, ``temperature`` or ``seconds:N``."""

    mode: Literal["off", "temperature", "seconds"] = "off"
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"seconds:{self.seconds:g}" if self.mode == "seconds" else self.mode


class CompareBaseline(_Frozen):
    """The saved run ``--llem-compare`` names, found and read before any case runs.

    Under ``--llem-compare=history[:K]`` ``record`` is the newest run of the history,
    ``history`` the older ones (oldest first) and ``note`` says when the history was too short.
    """

    path: Path
    record: RunRecord
    history: tuple[RunRecord, ...] = ()
    label: str | None = None
    note: str | None = None


class StoreOptions(_Frozen):
    """Saving, comparing and gating runs (``--llem-save``, ``--llem-compare``, ...).

    ``compare_baseline`` is the run ``compare`` names, once
    :func:`~pytest_llem.options.build.load_compare_baseline` has read it at start-up.
    """

    storage: Path
    save: bool = False
    save_name: str | None = None
    compare: str | None = None
    rules: tuple[Any, ...] = ()
    fail_inconclusive: bool = False
    gate_estimated: bool = False
    strict: bool = False
    drift_margin: DriftMargin = DEFAULT_DRIFT_MARGIN
    csv: Path | None = None
    compare_baseline: CompareBaseline | None = None
    calibrate: int | None = None


class EnergyOptions(_Frozen):
    """How energy is measured: baseline, short windows, cooldown, CodeCarbon's country.

    ``baseline_forced`` is True when ``--llem-baseline-s`` was given on the command line: the
    baseline is then measured afresh instead of reused from the cache.
    """

    baseline_s: float = DEFAULT_BASELINE_S
    baseline_forced: bool = False
    min_window_s: float = DEFAULT_MIN_WINDOW_S
    cooldown: CooldownSpec = Field(default_factory=CooldownSpec)
    country_iso_code: str | None = None


class LlemOptions(_Frozen):
    """The plugin's options after validation.

    ``cli_layer`` and ``ini_layer`` are the case parameters each source sets (nested, as a
    case's parameters are); ``given`` is what the run record keeps of the options; ``origins``
    says, per option name, how a message names where its value came from (``--llem-NAME``,
    ``ini option llem_NAME`` or ``the default of --llem-NAME``).
    """

    cli_layer: dict[str, Any]
    ini_layer: dict[str, Any]
    meter: str
    report_dir: Path
    backend_names: tuple[str, ...] = BUILTIN_BACKENDS
    meter_names: tuple[str, ...] = METER_CHOICES
    ini_sweep_axes: dict[str, list[Any]] = Field(default_factory=dict)
    cli_sweep_axes: dict[str, list[Any]] = Field(default_factory=dict)
    shuffle_seed: int | None = None
    store: StoreOptions | None = None
    given: dict[str, Any] = Field(default_factory=dict)
    energy: EnergyOptions = Field(default_factory=EnergyOptions)
    gpu_groups: tuple[tuple[int, ...], ...] | None = None
    isolation: Literal["warn", "skip", "fail"] = "warn"
    timeout_s: float | None = None
    shard: ShardSpec | None = None
    origins: dict[str, str] = Field(default_factory=dict)
    adaptive: AdaptivePlan = Field(default_factory=AdaptivePlan)
    profile: ProfileRecord = Field(
        default_factory=lambda: ProfileRecord(name="smoke", reason="the default")
    )

    @property
    def sweep_axes(self) -> dict[str, list[Any]]:
        """The ini and command-line sweep axes together (the command line replaces an axis)."""
        return {**self.ini_sweep_axes, **self.cli_sweep_axes}

    def origin(self, name: str) -> str:
        """How a message names where option ``name``'s value came from."""
        flag = f"--llem-{name.replace('_', '-')}"
        return self.origins.get(name, f"the default of {flag}")
