"""The built-in model ``llem-tiny``: a tiny random-weight Llama built offline on first use.

The recipe trains a byte-level BPE tokenizer on text generated here and saves a seeded
two-layer Llama next to it. Every build gives byte-identical files, and a manifest of their
sha256 hashes lets :func:`ensure_tiny_model` detect a damaged copy and rebuild it. A process
hashes a copy once: later calls trust it while no file's size, time stamps or inode has changed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytest_llem.exceptions import BackendNotAvailableError, ModelLoadError

__all__ = [
    "TINY_MODEL_NAME",
    "build_tiny_model",
    "cache_root",
    "ensure_tiny_model",
    "quiet_progress_bars",
    "tiny_model_path",
]

logger = logging.getLogger("pytest_llem")

#: The model name a case uses to ask for the built-in model.
TINY_MODEL_NAME = "llem-tiny"

# Bump when anything below changes what a build writes: a new folder name keeps old copies valid.
_RECIPE_VERSION = 1
_MANIFEST = "llem-manifest.json"
_SEED = 20_261_126
_VOCAB_SIZE = 1024
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
_MAX_POSITIONS = 2048
_INSTALL_HINT = "pip install 'pytest-llem[transformers]'"
# A file changed within this long of its verification may keep its time stamps (coarse file
# system clocks), so a copy that recent is hashed again rather than trusted (as git does).
_RACY_NS = 2_000_000_000

# folder -> the stat signature of its files when this process last found them intact.
_verified: dict[Path, tuple[tuple[str, int, int, int, int], ...]] = {}


def cache_root() -> Path:
    """The folder pytest-llem caches things in.

    Returns:
        ``$XDG_CACHE_HOME/pytest-llem`` when ``XDG_CACHE_HOME`` is set, otherwise
        ``~/.cache/pytest-llem``.
    """
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "pytest-llem"


def tiny_model_path() -> Path:
    """The folder that holds (or will hold) the current build of ``llem-tiny``."""
    return cache_root() / "models" / f"{TINY_MODEL_NAME}-v{_RECIPE_VERSION}"


def ensure_tiny_model(*, progress: Callable[[str], None] | None = None) -> Path:
    """Return the ``llem-tiny`` folder, building it first when it is missing or damaged.

    Args:
        progress: Called with a short line of text when a build starts and ends.

    Returns:
        A folder that ``AutoTokenizer`` and ``AutoModelForCausalLM`` can load.

    Raises:
        BackendNotAvailableError: torch, transformers or tokenizers is not installed.
        ModelLoadError: the model could not be built or written.
    """
    target = tiny_model_path()
    if _verified_before(target) or _is_intact(target):
        return target
    _report(progress, f"building {TINY_MODEL_NAME} in {target}")
    started = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache folder is not secret
    except OSError as e:
        raise ModelLoadError(f"cannot create {TINY_MODEL_NAME} under {target.parent}: {e}") from e
    try:
        build_tiny_model(staging)
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _is_intact(target):
        raise ModelLoadError(f"{TINY_MODEL_NAME} at {target} failed verification after building")
    elapsed = time.perf_counter() - started
    _report(progress, f"{TINY_MODEL_NAME} ready ({elapsed:.1f} s)")
    return target


def build_tiny_model(target: Path) -> None:
    """Build ``llem-tiny`` into ``target`` (created if needed), deterministically and offline.

    The user's torch random state is left untouched.

    Args:
        target: The folder to write the tokenizer, weights, configs and manifest into.

    Raises:
        BackendNotAvailableError: torch, transformers or tokenizers is not installed.
        ModelLoadError: the files could not be written.
    """
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise BackendNotAvailableError("transformers", _INSTALL_HINT) from e

    try:
        target.mkdir(parents=True, exist_ok=True)
        tokenizer = _train_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=_MAX_POSITIONS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model = _seeded_model(torch, LlamaForCausalLM, config)
        with quiet_progress_bars():
            model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        _portable_tokenizer_class(target)
        _write_manifest(target)
    except OSError as e:
        raise ModelLoadError(f"cannot write {TINY_MODEL_NAME} to {target}: {e}") from e


def _seeded_model(torch: Any, model_class: Any, config: Any) -> Any:
    """Random weights that are the same on every machine, whatever the caller's torch state."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(_SEED)
            return model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Turn transformers' tqdm bars off for a block: pytest-llem reports progress itself."""
    hf_logging: Any = importlib.import_module("transformers.utils.logging")
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _portable_tokenizer_class(folder: Path) -> None:
    # transformers 5 writes its own class name, which 4.x (and engines pinned to it) cannot load;
    # both major versions load PreTrainedTokenizerFast.
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _report(progress: Callable[[str], None] | None, message: str) -> None:
    logger.info(message)
    if progress is not None:
        progress(message)


def _train_tokenizer() -> Any:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        transformers: Any = importlib.import_module("transformers")
    except ImportError as e:
        raise BackendNotAvailableError("transformers", _INSTALL_HINT) from e

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    with _tokenizers_parallelism_off():
        tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=_MAX_POSITIONS,
    )


@contextmanager
def _tokenizers_parallelism_off() -> Iterator[None]:
    # Parallel merge counting may break ties differently from run to run.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


_SUBJECTS = (
    "The model",
    "A small team",
    "The teacher",
    "My neighbour",
    "The engineer",
    "A curious child",
    "The committee",
    "Our server",
    "The river",
    "A tired runner",
    "The baker",
    "The old library",
)
_VERBS = (
    "measures",
    "explains",
    "builds",
    "repairs",
    "describes",
    "follows",
    "compares",
    "counts",
    "writes",
    "plans",
    "watches",
    "improves",
)
_OBJECTS = (
    "the energy used by each request",
    "a simple recipe for bread",
    "the route along the coast",
    "every token in the batch",
    "the history of the town",
    "a function that sorts numbers",
    "the price of fresh vegetables",
    "the weather for the weekend",
    "a letter to the council",
    "the score of the match",
    "the memory of the machine",
    "a song about the harbour",
)
_ENDINGS = (
    "before the meeting starts.",
    "in about ten minutes.",
    "with great care.",
    "because the numbers changed.",
    "and then rests for a while.",
    "on a quiet Sunday morning.",
    "without any help.",
    "while the kettle boils.",
    "for the third time this week.",
)
_CODE = (
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    'if value is None:\n    raise ValueError("missing value")\n',
    "SELECT name, COUNT(*) FROM orders GROUP BY name;\n",
    "const total = items.reduce((sum, x) => sum + x.price, 0);\n",
)


def _training_corpus() -> Iterator[str]:
    from pytest_llem.data.prompts import BUILTIN_PROMPT_SETS, load_prompts

    for name in BUILTIN_PROMPT_SETS:
        # A count past the set's size is harmless: the tokenizer only learns frequencies.
        yield from load_prompts(name, num_prompts=512)
    rng = random.Random(_SEED)
    for _ in range(3000):
        yield (
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_ENDINGS)}"
        )
    for _ in range(400):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        yield f"{a} + {b} = {a + b}. {a} x {b} = {a * b}. {rng.random():.4f}"
    yield from _CODE * 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {
        p.relative_to(folder).as_posix(): _sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != _MANIFEST
    }
    manifest = {"name": TINY_MODEL_NAME, "recipe_version": _RECIPE_VERSION, "files": files}
    (folder / _MANIFEST).write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _is_intact(folder: Path) -> bool:
    """Hash every file of the manifest; remember the folder's stat signature when intact."""
    _verified.pop(folder, None)
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("recipe_version") != _RECIPE_VERSION or not files:
            return False
        before = _signature(folder, files)
        if not all(_sha256(folder / name) == digest for name, digest in files.items()):
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if _signature(folder, files) == before and _settled(before):
        _verified[folder] = before
    return True


def _verified_before(folder: Path) -> bool:
    """True when this process hashed ``folder`` and found it intact, and no file of it has
    changed since (same size, modification and change times, inode): no need to hash again."""
    known = _verified.get(folder)
    if known is None:
        return False
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        return _signature(folder, manifest["files"]) == known
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _signature(folder: Path, files: dict[str, str]) -> tuple[tuple[str, int, int, int, int], ...]:
    """Size, modification and change times and inode of the manifest and each file it lists."""
    names = [_MANIFEST, *sorted(files)]
    signature = []
    for name in names:
        st = (folder / name).stat()
        signature.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(signature)


def _settled(signature: tuple[tuple[str, int, int, int, int], ...]) -> bool:
    """True when no file was changed so recently that a change might not show in its stamps."""
    now = time.time_ns()
    return all(now - max(mtime, ctime) > _RACY_NS for _, _, mtime, ctime, _ in signature)


def _install(staging: Path, target: Path) -> None:
    """Move a finished build into place; if another process got there first, keep theirs."""
    if target.exists() and not _is_intact(target):
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        try:
            target.rename(stale / "old")
        except OSError as e:
            if target.exists() and not _is_intact(target):
                raise ModelLoadError(f"cannot replace the damaged copy at {target}: {e}") from e
        finally:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError as e:
        if _is_intact(target):
            logger.debug("another process installed %s first; keeping it", target)
            return
        raise ModelLoadError(f"cannot move the new {TINY_MODEL_NAME} into {target}: {e}") from e
