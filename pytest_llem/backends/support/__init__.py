"""What every backend needs and no engine does differently, written once.

The adapter base (:mod:`.adapter`), model sources and checkpoint facts (:mod:`.checkpoint`,
:mod:`.hub`), prompt ids and vocabularies (:mod:`.tokens`), peak memory from ``/proc``
(:mod:`.memory`), out-of-memory detection and the errors engines' failures become
(:mod:`.failures`), progress lines (:mod:`.progress`), the base of engines that schedule
requests themselves (:mod:`.scheduling`) and an asyncio loop on a thread for engines with an
asynchronous client (:mod:`.event_loop`). None of it imports an engine.
"""

from __future__ import annotations

from pytest_llem.backends.support.adapter import CASE_DTYPES, EngineAdapter
from pytest_llem.backends.support.checkpoint import (
    ModelSource,
    ParameterCount,
    checkpoint_config_value,
    count_parameters,
    local_folder,
    resolve_model_source,
)
from pytest_llem.backends.support.event_loop import EventLoopThread
from pytest_llem.backends.support.failures import (
    engine_failure,
    first_line,
    is_out_of_memory,
    load_errors,
    require_loaded,
    says_out_of_memory,
)
from pytest_llem.backends.support.hub import hub_snapshot
from pytest_llem.backends.support.memory import (
    MIB,
    lifetime_peak_rss,
    proc_file,
    read_vm_hwm_kib,
    reset_peak_rss,
)
from pytest_llem.backends.support.progress import ProgressCallback, report
from pytest_llem.backends.support.scheduling import EngineScheduledBackend, cancel_futures, gather
from pytest_llem.backends.support.tokens import (
    Encoder,
    count_prompt_tokens,
    prompt_ids,
    tokenizer_vocabulary,
)

__all__ = [
    "CASE_DTYPES",
    "MIB",
    "Encoder",
    "EngineAdapter",
    "EngineScheduledBackend",
    "EventLoopThread",
    "ModelSource",
    "ParameterCount",
    "ProgressCallback",
    "cancel_futures",
    "checkpoint_config_value",
    "count_parameters",
    "count_prompt_tokens",
    "engine_failure",
    "first_line",
    "gather",
    "hub_snapshot",
    "is_out_of_memory",
    "lifetime_peak_rss",
    "load_errors",
    "local_folder",
    "proc_file",
    "prompt_ids",
    "read_vm_hwm_kib",
    "report",
    "require_loaded",
    "reset_peak_rss",
    "resolve_model_source",
    "says_out_of_memory",
    "tokenizer_vocabulary",
]
