"""fastspawn: a fast, safe drop-in for ``torch.multiprocessing.spawn``.

    import fastspawn as mp          # instead of: import torch.multiprocessing as mp
    mp.spawn(train, args=(cfg,), nprocs=4)

Everything else of ``torch.multiprocessing`` (Queue, SimpleQueue, Process,
get_context, sharing strategies, ...) is re-exported unchanged, so the module
can replace it wholesale. See README.md for the semantics of the start methods.
"""
from __future__ import annotations

import multiprocessing as _multiprocessing
import os as _os

import torch.multiprocessing as _torch_mp
from torch.multiprocessing import *  # noqa: F403 - the drop-in namespace

from . import (
    _C,  # noqa: F401 - fail early if the extension is missing
    backend,  # noqa: F401 - registers the "fastspawn" torch.distributed backend
)
from ._errors import (
    ArgumentPicklingError,
    ProcessException,
    ProcessExitedException,
    ProcessRaisedException,
    RankFailure,
)
from ._launch import (
    DEFAULT_START_METHOD,
    ENV_VAR_PARALLEL_START,
    START_METHODS,
    ProcessContext,
    RankProcess,
    SpawnContext,
    fork_safety_issues,
    spawn,
    start_processes,
    start_zygote,
)
from ._rendezvous import default_backend, init_process_group
from ._version import __version__  # noqa: F401 - fastspawn.__version__
from ._zygote import ZygoteError
from .store import Store, StoreServer, StoreTimeoutError

if _os.environ.get("FASTSPAWN_PRESTART_ZYGOTE") == "1":
    start_zygote()  # ahead of need: the first zygote spawn then finds torch imported

_MP_CONTEXT_FOR = {"auto": "forkserver", "zygote": "forkserver"}


def get_context(method: str | None = None) -> _multiprocessing.context.BaseContext:
    """multiprocessing's context for ``method``; fastspawn's own methods
    ("auto", "zygote") map to "forkserver", whose Queues and locks can be
    passed to ranks started any way fastspawn starts them."""
    if method in _MP_CONTEXT_FOR:
        method = _MP_CONTEXT_FOR[method]
    return _multiprocessing.get_context(method)


__all__ = list(_torch_mp.__all__) + [
    "spawn", "start_processes", "ProcessContext", "SpawnContext", "ENV_VAR_PARALLEL_START",
    "RankProcess", "ProcessException",
    "ProcessRaisedException", "ProcessExitedException", "ArgumentPicklingError",
    "RankFailure", "ZygoteError", "start_zygote", "fork_safety_issues", "get_context",
    "START_METHODS", "DEFAULT_START_METHOD", "init_process_group", "default_backend", "Store",
    "StoreServer", "StoreTimeoutError",
]
