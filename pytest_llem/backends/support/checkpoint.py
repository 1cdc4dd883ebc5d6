"""Where a backend's model comes from, and what its checkpoint says without loading it.

Every engine is given either a local folder or a Hugging Face hub id; :func:`resolve_model_source`
decides which, the same way for all of them. Engines that keep the model out of this process's
reach (vLLM, TensorRT-LLM) count its parameters from the safetensors headers with
:func:`count_parameters` and read its ``config.json`` with :func:`checkpoint_config_value`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pytest_llem.data.tiny_model import TINY_MODEL_NAME, ensure_tiny_model
from pytest_llem.exceptions import ModelLoadError

__all__ = [
    "EMBEDDING_TENSORS",
    "ModelSource",
    "ParameterCount",
    "checkpoint_config_value",
    "count_parameters",
    "local_folder",
    "resolve_model_source",
]

#: Names of input-embedding tensors in Hugging Face checkpoints (Llama, GPT-2, BLOOM, GPT-NeoX).
EMBEDDING_TENSORS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)
_DOTTED_EMBEDDING_TENSORS = tuple(f".{name}" for name in EMBEDDING_TENSORS)
#: A safetensors header longer than this is taken for a corrupt file, not read.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelSource:
    """What an engine is given as its model, and the local folder behind it.

    Attributes:
        source: A folder path, or a Hugging Face hub id.
        folder: The resolved local folder; None for a hub id (the engine, or the backend,
            finds or downloads it).
    """

    source: str
    folder: str | None

    @property
    def is_hub_id(self) -> bool:
        """Whether ``source`` names a hub model rather than a folder."""
        return self.folder is None


class ParameterCount(NamedTuple):
    """Parameters of a checkpoint: all of them, and those outside the input embedding."""

    total: int
    #: None when no input-embedding tensor was recognised.
    non_embedding: int | None


def resolve_model_source(
    name: str, *, progress: Callable[[str], None] | None = None
) -> ModelSource:
    """Resolve a case's ``model``: the built-in tiny model, a folder, or a hub id.

    Args:
        name: The case's ``model`` value.
        progress: Told about slow steps (building ``llem-tiny`` the first time).

    Returns:
        The built (or cached) ``llem-tiny`` folder, an existing folder, or ``name`` itself as a
        hub id (``org/name`` or ``name``).

    Raises:
        ModelLoadError: ``name`` is a file, or a path (absolute, ``./``, ``~``, or with more
            than one ``/``) that does not exist.
    """
    if name == TINY_MODEL_NAME:
        tiny = str(ensure_tiny_model(progress=progress))
        return ModelSource(tiny, tiny)
    path = Path(name).expanduser()
    folder = local_folder(name)
    if folder is not None:
        return ModelSource(str(path), folder)
    if path.exists():
        raise ModelLoadError(f"model {name!r} is a file; expected a model folder")
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model {name!r} is not a folder (no such path)")
    return ModelSource(name, None)


def local_folder(name: str | None) -> str | None:
    """The resolved folder that ``name`` names (``~`` expanded); None when it names none.

    Unlike :func:`resolve_model_source` it never builds ``llem-tiny`` and never raises: for
    a backend that only records where a model lies (a server loads its own).
    """
    if not name:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else None


def count_parameters(folder: str | None) -> ParameterCount | None:
    """Total and non-embedding parameters from the safetensors headers of a model folder.

    Only the headers are read (tensor shapes), never the weights. Quantized checkpoints store
    packed tensors, so their count is of stored elements.

    Args:
        folder: A local model folder, or None.

    Returns:
        None when there is no folder, no safetensors file, or a header cannot be read.
    """
    if folder is None or not Path(folder).is_dir():
        return None
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = embedding = 0
    try:
        for path in files:
            for tensor, count in _tensor_sizes(path):
                total += count
                if tensor in EMBEDDING_TENSORS or tensor.endswith(_DOTTED_EMBEDDING_TENSORS):
                    embedding += count
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return ParameterCount(total, total - embedding if embedding else None)


def _tensor_sizes(path: Path) -> list[tuple[str, int]]:
    """Each tensor's name and element count, from one file's header (8-byte length, JSON)."""
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size <= _MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{path} has no readable safetensors header")
        header = json.loads(handle.read(size))
    return [
        (name, math.prod(int(n) for n in entry["shape"]))
        for name, entry in header.items()
        if name != "__metadata__"
    ]


def checkpoint_config_value(folder: str | None, key: str) -> Any:
    """A top-level value of the checkpoint's ``config.json``; None when there is none."""
    if folder is None:
        return None
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get(key) if isinstance(config, dict) else None
