"""Hugging Face hub models as local folders, for backends that load from a folder.

A hub id is looked up in the local cache first; a model that is not there is downloaded before
anything is measured, unless ``HF_HUB_OFFLINE`` is set. Only the files a model needs to load are
fetched.
"""

from __future__ import annotations

import os

from pytest_llem.backends.support.failures import first_line
from pytest_llem.backends.support.progress import ProgressCallback, report
from pytest_llem.exceptions import LlemError, ModelLoadError

__all__ = ["hub_snapshot"]

#: Files fetched for a hub model: configs, weights in safetensors, tokenizers, remote code.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja"]


def hub_snapshot(repo_id: str, *, progress: ProgressCallback | None = None) -> str:
    """The local folder of a Hugging Face hub model: from the local cache, else downloaded
    (before any measurement) unless ``HF_HUB_OFFLINE`` is set.

    Args:
        repo_id: The hub id (``org/name``).
        progress: Told when a download starts.

    Raises:
        ModelLoadError: huggingface_hub is missing, or the model is neither cached nor
            downloadable (or ``HF_HUB_OFFLINE`` forbids downloading it).
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelLoadError(
            f"model {repo_id!r} is not a folder and huggingface_hub is not installed"
        ) from e
    try:
        return str(snapshot_download(repo_id, local_files_only=True, allow_patterns=_HUB_FILES))
    except LlemError:
        raise  # --llem-timeout-s or the like: not a missing model
    except Exception as e:
        cached_error = e
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(
            f"model {repo_id!r} is not a folder and not in the local Hugging Face cache "
            "(HF_HUB_OFFLINE is set, so it was not downloaded)"
        ) from cached_error
    report(progress, f"downloading {repo_id} from the Hugging Face hub (not measured)")
    try:
        return str(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except LlemError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"model {repo_id!r} is not a folder, not in the local Hugging Face cache, and "
            f"could not be downloaded: {type(e).__name__}: {first_line(e)}"
        ) from e
