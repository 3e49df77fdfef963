"""Sending the rank function and its arguments to processes that do not fork
from the caller (zygote, spawn, forkserver).

Pickling goes through multiprocessing.reduction.ForkingPickler's reducers, so
multiprocessing Queues, Connections and torch tensors (shared memory) travel
as they do with torch.multiprocessing. File descriptors such objects need are
collected by a "spawning popen" stand-in and handed to the child. Functions and
classes from ``__main__`` (notebooks, ``python -c``) and lambdas or local
functions are pickled by value with cloudpickle.
"""
from __future__ import annotations

import io
import sys
import types
from collections import ChainMap
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any, ClassVar

import cloudpickle

from . import _mpcompat
from ._errors import ArgumentPicklingError

# fds received by a rank, indexed as the parent's _FdCollector numbered them.
_inherited_fds: list[int] = []


def set_inherited_fds(fds: list[int]) -> None:
    _inherited_fds[:] = list(fds)


class InheritedFd:
    """Pickled stand-in for an fd; ``detach()`` in the rank returns the real fd."""

    def __init__(self, index: int):
        self.index = index

    def detach(self) -> int:
        return _inherited_fds[self.index]


class _FdCollector:
    """What multiprocessing calls the spawning popen: collects fds to pass."""

    DupFd = InheritedFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1


def _rebuild_code(rebuild: Any, args: tuple, filename: str) -> types.CodeType:
    return rebuild(*args).replace(co_filename=filename)


def _keeping_filename(code_reduce: Callable[[types.CodeType], tuple[Any, ...]],
                      ) -> Callable[[types.CodeType], tuple[Any, ...]]:
    # cloudpickle replaces co_filename with "<dynamic-code>"; keep the real one
    # so a rank's traceback shows the file and the source line.
    def reduce(code: types.CodeType) -> tuple[Any, ...]:
        rebuild, args = code_reduce(code)
        return _rebuild_code, (rebuild, args, code.co_filename)

    return reduce


_cloudpickle_code_reduce = _mpcompat.cloudpickle_code_reduce()
_own_reducers: dict[type, Callable[..., Any]] = {}
if _cloudpickle_code_reduce is not None:
    _own_reducers[types.CodeType] = _keeping_filename(_cloudpickle_code_reduce)


class _Pickler(cloudpickle.Pickler):
    # ForkingPickler's extra reducers (Connection, socket, torch tensors) first.
    dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
        _own_reducers, _mpcompat.forking_reducers(), cloudpickle.Pickler.dispatch_table)


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=5).dump(obj)
    return buf.getvalue()


def _main_is_importable() -> bool:
    main = sys.modules.get("__main__")
    return bool(getattr(main, "__file__", None)) and not hasattr(sys, "ps1")


class ByValue:
    """Wraps a function so plain pickling sends it by value (cloudpickle)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __reduce__(self) -> tuple[Any, ...]:
        return cloudpickle.loads, (_dumps(self.obj),)


def needs_by_value(fn: Any) -> bool:
    """Whether the function cannot be found by name in a fresh interpreter."""
    qualname = getattr(fn, "__qualname__", "")
    if "<lambda>" in qualname or "<locals>" in qualname:
        return True
    return getattr(fn, "__module__", None) == "__main__" and not _main_is_importable()


def _describe(exc: BaseException, what: str, start_method: str) -> ArgumentPicklingError:
    return ArgumentPicklingError(
        f"fastspawn: {what} cannot be sent to the ranks with start_method={start_method!r}: "
        f"{type(exc).__name__}: {exc}. Pass picklable objects (module-level functions, "
        "tensors, multiprocessing Queues created with fastspawn.get_context(...)), or use "
        "start_method='fork', where the ranks inherit everything."
    )


def dumps_with_fds(obj: Any, start_method: str) -> tuple[bytes, list[int]]:
    """Pickle obj for a zygote child; returns the bytes and the fds to pass."""
    collector = _FdCollector()
    _mpcompat.set_spawning_popen(collector)
    try:
        data = _dumps(obj)
    except Exception as exc:
        raise _describe(exc, "the function or its arguments", start_method) from exc
    finally:
        _mpcompat.set_spawning_popen(None)
    return data, collector.fds


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


def check_picklable_for_mp(fn: Any, args: tuple, kwargs: dict, start_method: str) -> None:
    """Fail early, before any rank starts, when multiprocessing could not send these."""
    collector = _FdCollector()
    _mpcompat.set_spawning_popen(collector)
    try:
        ForkingPickler.dumps((fn, args, kwargs))
    except Exception as exc:
        raise _describe(exc, "the function or its arguments", start_method) from exc
    finally:
        _mpcompat.set_spawning_popen(None)
