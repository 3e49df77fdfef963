"""The launcher's side of the guardian: which process groups it must kill if
this process dies (even by SIGKILL).

The guardian itself is C (``_C.guardian_*``): a small process, started on first
use, that holds one end of a pipe to this process and kills every registered
process group when the pipe breaks. This module remembers what was registered,
so that a guardian that was killed can be replaced and told everything again.
"""
from __future__ import annotations

import os

from . import _C

# Process groups registered with the guardian (a rank's pid is its pgid).
_watched: set[int] = set()


def watch(pgid: int) -> None:
    """Make the guardian kill process group ``pgid`` if this process dies."""
    try:
        _C.guardian_watch(pgid)
    except ConnectionError:  # the guardian was killed: start another, re-register
        _C.guardian_restart()
        for other in _watched:
            _C.guardian_watch(other)
        _C.guardian_watch(pgid)
    _watched.add(pgid)


def unwatch(pgid: int) -> None:
    """Forget ``pgid`` (its ranks have ended); unknown groups are ignored."""
    if pgid in _watched:
        _watched.discard(pgid)
        try:
            _C.guardian_unwatch(pgid)
        except OSError:
            pass


def watched() -> frozenset[int]:
    """The process groups this process has registered."""
    return frozenset(_watched)


# A forked child (a rank, from fastspawn's C fork paths too: they call
# PyOS_AfterFork_Child) has no guardian of its own yet; the launcher's
# registrations are not its own.
os.register_at_fork(after_in_child=_watched.clear)
