"""Exceptions raised by fastspawn's launcher, compatible with torch's."""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any, cast

try:  # Subclass torch's own classes so existing `except` clauses still catch ours.
    from torch.multiprocessing.spawn import ProcessException as _ProcessException
    from torch.multiprocessing.spawn import ProcessExitedException as _ProcessExited
    from torch.multiprocessing.spawn import ProcessRaisedException as _ProcessRaised
except ImportError:  # pragma: no cover - torch is a dependency, but keep the API importable

    class _ProcessException(Exception):  # type: ignore[no-redef]
        def __init__(self, msg: str, error_index: int, error_pid: int):
            super().__init__(msg)
            self.msg = msg
            self.error_index = error_index
            self.error_pid = error_pid

        def __reduce__(self) -> tuple[Any, ...]:
            return type(self), (self.msg, self.error_index, self.error_pid)

    class _ProcessRaised(_ProcessException):  # type: ignore[no-redef]
        pass

    class _ProcessExited(_ProcessException):  # type: ignore[no-redef]
        def __init__(self, msg: str, error_index: int, error_pid: int, exit_code: int,
                     signal_name: str | None = None):
            super().__init__(msg, error_index, error_pid)
            self.exit_code = exit_code
            self.signal_name = signal_name

        def __reduce__(self) -> tuple[Any, ...]:
            return type(self), (self.msg, self.error_index, self.error_pid, self.exit_code,
                                self.signal_name)


@dataclasses.dataclass
class RankFailure:
    """What went wrong in one rank, as the launcher saw it."""

    index: int
    pid: int
    exit_code: int | None  # None when a signal ended it
    signal_name: str | None  # "SIGKILL" etc. when a signal ended it
    traceback: str | None  # the rank's formatted traceback, if it raised
    exception: BaseException | None  # the unpickled exception, if it could be
    order: int  # 1 for the first rank seen to exit, 2 for the next ...
    killed_by_launcher: bool = False  # the launcher had signalled it before it died

    def summary(self) -> str:
        """One line: which rank, and how it ended."""
        if self.traceback:
            last = self.traceback.rstrip().splitlines()[-1] if self.traceback.strip() else ""
            return f"process {self.index} (pid {self.pid}) raised: {last}"
        if self.signal_name:
            return (f"process {self.index} (pid {self.pid}) terminated with signal "
                    f"{self.signal_name}")
        return f"process {self.index} (pid {self.pid}) terminated with exit code {self.exit_code}"


ProcessException = _ProcessException


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - any failure means "not picklable"
        return False
    return True


class _RankError:
    """What fastspawn adds to torch's two exceptions: both ``error_pid`` (torch >=
    2.10) and ``pid`` (earlier torch), ``failures``, and pickling that keeps every
    attribute (torch's own ``__reduce__`` keeps only the constructor arguments)."""

    failures: list[RankFailure]

    def _init_extras(self, error_pid: int) -> None:
        self.error_pid = error_pid
        self.pid = error_pid
        self.failures = []

    def __reduce__(self) -> tuple[Any, ...]:
        # An exception's __reduce__ is a tuple (object's may be a str: not here).
        cls, args = cast(tuple[Any, ...], super().__reduce__())[:2]
        state = dict(self.__dict__)
        # A rank's exception that cannot travel is dropped; its traceback text stays.
        state["failures"] = [f if f.exception is None or _picklable(f.exception)
                             else dataclasses.replace(f, exception=None)
                             for f in state.get("failures", [])]
        return cls, args, state


class ProcessRaisedException(_RankError, _ProcessRaised):
    """A rank raised an exception; the message carries its traceback.

    ``failures`` lists every failed rank, root cause first.
    """

    def __init__(self, msg: str, error_index: int, error_pid: int):
        super().__init__(msg, error_index, error_pid)
        self._init_extras(error_pid)


class ProcessExitedException(_RankError, _ProcessExited):
    """A rank exited with a non-zero code or was killed by a signal.

    ``failures`` lists every failed rank, root cause first.
    """

    def __init__(self, msg: str, error_index: int, error_pid: int, exit_code: int,
                 signal_name: str | None = None):
        super().__init__(msg, error_index, error_pid, exit_code, signal_name)
        self._init_extras(error_pid)


class ArgumentPicklingError(TypeError, pickle.PicklingError):
    """The function or its arguments cannot be sent to the ranks."""


OOM_HINT = (
    "SIGKILL usually means the kernel's out-of-memory killer ended the process "
    "(check `dmesg` or `journalctl -k` for 'Out of memory'), or another program killed it."
)
