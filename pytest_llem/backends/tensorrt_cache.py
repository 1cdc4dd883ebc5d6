"""Where the TensorRT backend keeps the engines the trt runtime compiles.

TensorRT-LLM's build cache deletes every entry of its root that is not one of its records, and
all but its newest 10 records, whenever it writes an engine, so it is given a folder of its own
below the user's ``tensorrt.engine_cache_dir`` and never the user's folder itself.
"""

from __future__ import annotations

from pathlib import Path

from pytest_llem.config.models import TensorRTConfig
from pytest_llem.exceptions import BackendConfigError

__all__ = ["ENGINE_CACHE_SUBDIR", "cache_folder", "engine_build_note", "engine_cache_root"]

_NAME = "tensorrt"

#: The folder under ``tensorrt.engine_cache_dir`` that the plugin hands to TensorRT-LLM's build
#: cache. That cache deletes every entry of its root that is not one of its records, and all but
#: its newest 10 records, whenever it writes an engine: it must have a folder to itself.
ENGINE_CACHE_SUBDIR = "pytest-llem-trt-engines"


def engine_cache_root(engine_cache_dir: str) -> Path:
    """The folder given to TensorRT-LLM's build cache: a subfolder of ``engine_cache_dir`` that
    holds nothing but the cache's own records.

    TensorRT-LLM prunes its cache root before it writes an engine (every entry without a valid
    ``metadata.json`` and ``content/`` is deleted, and all but the newest 10 records), so the
    user's folder is never handed to it; the subfolder is created here, and one that holds
    anything else is refused rather than pruned.

    Raises:
        BackendConfigError: The subfolder cannot be created, or holds other entries.
    """
    root = cache_folder(engine_cache_dir)
    param = "tensorrt.engine_cache_dir"
    try:
        root.mkdir(parents=True, exist_ok=True)
        foreign = sorted(entry.name for entry in root.iterdir() if not _is_cache_entry(entry))
    except OSError as e:
        raise BackendConfigError(_NAME, param, f"cannot use {root} for engines: {e}") from e
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise BackendConfigError(
            _NAME,
            param,
            f"{root} holds entries that are not TensorRT-LLM engines ({shown}); TensorRT-LLM's "
            "build cache would delete them, so the plugin keeps this folder for engines only: "
            "move them elsewhere",
        )
    return root


def cache_folder(engine_cache_dir: str) -> Path:
    """The engines' own subfolder of the user's ``tensorrt.engine_cache_dir``."""
    return Path(engine_cache_dir).expanduser().resolve() / ENGINE_CACHE_SUBDIR


def _is_cache_entry(entry: Path) -> bool:
    """A build-cache record (``metadata.json`` and ``content/``) or one being written
    (``<record>.dummy``, which TensorRT-LLM itself cleans up)."""
    if not entry.is_dir():
        return False
    if entry.name.endswith(".dummy"):
        return True
    return (entry / "metadata.json").is_file() and (entry / "content").exists()


def engine_build_note(options: TensorRTConfig) -> str:
    """The progress line saying where the trt runtime's engine comes from (not measured)."""
    if options.engine_cache_dir is None:
        return (
            "the trt runtime compiles a TensorRT engine before it runs (not measured); set "
            "tensorrt.engine_cache_dir to keep it for later runs"
        )
    return (
        f"TensorRT engines are cached in {cache_folder(options.engine_cache_dir)} (built once, "
        "not measured; TensorRT-LLM keeps the newest 10)"
    )
