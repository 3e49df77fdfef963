"""The launcher's side of the guardian: which process groups it must kill if
this process dies (even by SIGKILL).

The guardian itself is C (``_C.guardian_*``, guardian.c): a small process,
started on first use, that holds one end of a socket pair to this process and
kills every registered process group when it breaks. Each group is registered
with its leader's pidfd, and the guardian kills a group only while that leader
is unreaped: a group id is a pid number, which may belong to an unrelated
process once the leader has been reaped. The C side also remembers what is
registered, so a guardian that died is replaced and told everything again.

Ranks are registered by their supervisor (``Group.guard``), which unregisters
them before it reaps them. This module registers the other processes the
launcher starts (the zygote) and says what is registered.
"""
from __future__ import annotations

import errno
import os

from . import _C


def watch(pid: int) -> int:
    """Make the guardian kill the process group of ``pid`` (a child of this process,
    not reaped yet, that leads its own group) if this process dies. Returns the pidfd
    the registration goes by (-1 where the system has none): keep it open, and pass it
    to :func:`unwatch` before the child is reaped."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM):
            raise
        pidfd = -1  # no pidfds here: registered bare (killed unchecked, as before pidfds)
    try:
        _C.guardian_watch(pid, pidfd)
    except BaseException:
        if pidfd >= 0:
            os.close(pidfd)
        raise
    return pidfd


def unwatch(pgid: int, pidfd: int = -1) -> None:
    """Forget ``pgid`` and close its ``pidfd`` (from :func:`watch`); unknown groups are
    ignored."""
    try:
        _C.guardian_unwatch(pgid)
    except OSError:
        pass
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def watched() -> frozenset[int]:
    """The process groups this process has registered (a forked child: none of its
    parent's)."""
    return frozenset(_C.guardian_watched())
