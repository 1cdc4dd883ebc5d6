"""Checking, before any case runs, that a session can write what it writes at its end.

A run that measures for an hour and then finds its report folder read-only has lost the hour, so
``pytest_configure`` records the folders the run will write (report folder, CSV folder, storage
folder) and checks them either at once (an explicit llem run) or once collection finds llem
cases. A folder that cannot be written is a usage error naming the option that chose it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_llem.exceptions import ResultStoreError
from pytest_llem.options import LlemOptions
from pytest_llem.results.store import RUNS_DIRNAME, check_writable

__all__ = ["OUTPUTS", "check_outputs", "explicit_llem_run", "output_folders"]

#: The folders a session writes at its end, each with how a message names its option.
OUTPUTS = pytest.StashKey[list[tuple[Path, str]]]()


def output_folders(options: LlemOptions) -> list[tuple[Path, str]]:
    """The folders the run writes at its end, each with how a message names its option: the
    report folder (record, HTML page, journal), the CSV's folder and, when saving, the storage
    folder."""
    report_origin = options.origin("report_dir")
    folders = [
        (options.report_dir, report_origin),
        (options.report_dir / RUNS_DIRNAME, report_origin),
    ]
    store = options.store
    if store is not None and store.csv is not None:
        folders.append((store.csv.parent, "--llem-csv"))
    if store is not None and store.save:
        folders.append((store.storage, options.origin("storage")))
    return folders


def explicit_llem_run(config: pytest.Config, options: LlemOptions) -> bool:
    """Whether the session will write llem outputs whatever it collects: it saves or compares a
    run, or it is an xdist controller (which never sees the items its workers collect)."""
    store = options.store
    saves_or_compares = store is not None and (store.save or store.compare is not None)
    return saves_or_compares or bool(getattr(config.option, "numprocesses", None))


def check_outputs(config: pytest.Config) -> None:
    """Check the folders in ``config.stash[OUTPUTS]`` can be written. Not on xdist workers (the
    controller writes) nor for ``--help``/``--collect-only``.

    Raises:
        pytest.UsageError: a folder cannot be created or written, naming its option.
    """
    if hasattr(config, "workerinput") or any(
        getattr(config.option, name, False) for name in ("help", "collectonly")
    ):
        return
    for folder, origin in config.stash.get(OUTPUTS, []):
        try:
            check_writable(folder)
        except ResultStoreError as e:
            raise pytest.UsageError(f"pytest-llem: {origin}: {e}") from e
