"""What the C supervisor knows of one rank (``_C.Group.info(index)``), as one
typed record.

The binding returns a named structure (``_C.RankInfo``, a PyStructSequence:
the 7-tuple ``(pid, state, exit_code, signal, order, killed, gone)`` with
``pidfd`` and ``setup_error`` by name); older builds returned the plain 7-tuple.
:meth:`RankInfo.from_c` reads either, so the rest of the package uses field
names and never positions.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from . import _C


class RankInfo(NamedTuple):
    """One rank as the supervisor last saw it."""

    pid: int
    state: int  # _C.PROC_* (running, exited)
    exit_code: int  # meaningful once exited and signal == 0
    signal: int  # the signal that ended it, 0 if none
    order: int  # 1 for the first rank seen to exit, 2 for the next, 0 while running
    killed: bool  # the launcher had signalled it
    gone: bool  # seen to have exited (its status may still be on its way)
    pidfd: int = -1  # the supervisor's pidfd for it (open until the group closes), or -1
    setup_error: str | None = None  # why its child-side set-up failed, if it did

    @classmethod
    def from_c(cls, raw: Any) -> RankInfo:
        """Build from what ``Group.info`` returned (tuple or named structure)."""
        if hasattr(raw, "exit_code"):
            return cls(raw.pid, raw.state, raw.exit_code, raw.signal, raw.order,
                       bool(raw.killed), bool(raw.gone), getattr(raw, "pidfd", -1),
                       getattr(raw, "setup_error", None))
        pid, state, exit_code, sig, order, killed, gone = tuple(raw)[:7]
        return cls(pid, state, exit_code, sig, order, bool(killed), bool(gone))

    @property
    def exited(self) -> bool:
        """The rank's exit status is known."""
        return self.state == _C.PROC_EXITED

    @property
    def failed(self) -> bool:
        """It exited with a non-zero code or by a signal."""
        return self.exited and (self.exit_code != 0 or self.signal != 0)

    @property
    def exitcode(self) -> int | None:
        """multiprocessing's ``exitcode``: None while running, -signal if one ended it."""
        if not self.exited:
            return None
        return -self.signal if self.signal else self.exit_code
