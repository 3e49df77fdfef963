"""Every private name of the standard library (multiprocessing, threading) and
of cloudpickle that fastspawn needs, in one place.

A rank forked by fastspawn's C code, not by ``multiprocessing``, must look to
``multiprocessing`` exactly like a child it started itself (``current_process()``,
Queues' feeder threads, finalizers, exit handling); there is no public API for
that. Each use below says why it is needed and in which versions the name is
there. Checked present, with the same meaning, in CPython 3.8 through 3.13
(fastspawn requires 3.11); when a new Python moves one, this is the file to fix.
"""
from __future__ import annotations

import multiprocessing.context as _mp_context
import multiprocessing.process as _mp_process
import multiprocessing.util as _mp_util
import os
import threading
import types
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle


def become_new_process(name: str, daemon: bool) -> None:
    """In a process just forked by fastspawn: do what multiprocessing's
    ``BaseProcess._bootstrap`` does in a child it forked itself."""
    proc = _mp_process.BaseProcess(name=name)
    # _config (authkey, semprefix) and _parent_pid: attributes of every
    # BaseProcess since 3.4; current_process() and parent checks read them.
    proc._config = dict(_mp_process._current_process._config)  # type: ignore[attr-defined]
    proc._parent_pid = os.getppid()  # type: ignore[attr-defined]
    proc.daemon = daemon
    # _current_process (what current_process() returns) and _children (the
    # launcher's children are not this process's): module globals since 3.4.
    _mp_process._current_process = proc  # type: ignore[attr-defined]
    _mp_process._children = set()  # type: ignore[attr-defined]
    # The parent's finalizers must not run here; after-fork callbacks
    # (util.register_after_fork: Queues, locks) must. Both since 3.4.
    _mp_util._finalizer_registry.clear()  # type: ignore[attr-defined]
    _mp_util._run_after_forkers()  # type: ignore[attr-defined]
    # Thread._set_native_id (3.8+): the main thread's native_id is still the
    # parent's after a fork that did not go through os.fork's own bookkeeping.
    main = threading.main_thread()
    if hasattr(main, "_set_native_id"):
        main._set_native_id()


def run_exit_handlers() -> None:
    """What a multiprocessing child runs before it ``_exit``s: its finalizers
    (Queue feeder threads flush), then the wait for non-daemon threads."""
    # util._exit_function (since 3.4) and threading._shutdown (the interpreter's
    # own wait for non-daemon threads at exit, since 3.x): a rank leaves with
    # os._exit, which runs neither.
    _mp_util._exit_function()  # type: ignore[attr-defined]
    threading._shutdown()  # type: ignore[attr-defined]


def flush_std_streams() -> None:
    """Flush sys.stdout/sys.stderr as multiprocessing does around a fork (so
    buffered output is printed once) and before a child's ``_exit``."""
    _mp_util._flush_std_streams()  # type: ignore[attr-defined]  # since 3.8


def set_spawning_popen(popen: Any) -> None:
    """Make ``popen`` (``None`` to reset) the object that multiprocessing's
    reducers ask to duplicate fds for the child being started."""
    # context.set_spawning_popen: undocumented, no underscore, since 3.4.
    # Connections and Queues pickle their fds through it (DupFd).
    _mp_context.set_spawning_popen(popen)


def forking_reducers() -> dict[type, Callable[..., Any]]:
    """The reducers multiprocessing registers for sending objects to a child
    (Connection, socket, torch's tensors and storages via ``register``)."""
    # ForkingPickler._extra_reducers: the class-level registry behind
    # ForkingPickler.register (since 3.4); a pickler of our own (cloudpickle's)
    # can only use these reducers by reading it.
    reducers: dict[type, Callable[..., Any]] = ForkingPickler._extra_reducers  # type: ignore[attr-defined]
    return reducers


def cloudpickle_code_reduce() -> Callable[[types.CodeType], tuple] | None:
    """cloudpickle's reducer for code objects, or None where it has none.

    cloudpickle.cloudpickle._code_reduce (cloudpickle 2.x and 3.x): fastspawn
    wraps it to keep ``co_filename``, which cloudpickle replaces.
    """
    return getattr(cloudpickle.cloudpickle, "_code_reduce", None)
