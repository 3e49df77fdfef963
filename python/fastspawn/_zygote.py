"""The zygote: a clean interpreter that has already imported torch and forks
ranks on request.

Forking the launcher is the fastest start, but unsafe once the launcher has
initialised CUDA, holds a process group or runs other threads. The zygote is
started early (``fastspawn.start_zygote()``, or on first need), imports torch
once, and then forks all N ranks of a request in one go, so a warm start costs
N small forks instead of N torch imports. It is reused across spawn calls.

Protocol: one Unix stream socket pair, launcher <-> zygote, wrapped in
``multiprocessing.connection.Connection`` (its length-prefixed messages), each
message a pickle:
  zygote -> launcher: {"ready": True} once its imports are done.
  launcher -> zygote: the request, whose "nfds" says how many fds follow: the
      status pipe, one report pipe per rank, then the fds that the pickled
      arguments need. They follow with ``multiprocessing.reduction.sendfds``,
      at most 253 (the kernel's SCM_MAX_FD) per message, so a request may
      carry any number of them.
  zygote -> launcher: {"pids": [...]} or {"error": "..."}.
  launcher -> zygote: {"release": [pids]} when the job's handle closes (no reply).
  When a rank exits, the zygote reads its status without reaping it
  (``waitid(WNOWAIT)``) and writes an {int32 pid, int32 wait status} record to the
  request's status pipe, which the launcher's C supervisor reads. The rank stays
  a zombie, so its pid, which is its process group's id, cannot be handed to
  another process while the launcher may still signal that group. The release
  says the launcher is done with those ranks (it has killed what was left of
  their groups): the zygote SIGKILLs what is left once more (its own unreaped
  children: safe) and reaps them. If the launcher dies, the zygote dies with it
  (its parent-death signal) and its zombies go to init.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recvfds, sendfds
from typing import Any

from . import _C, _guardian

MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD: the kernel's limit on fds in one sendmsg
#: What the zygote imports before it forks anything. torch._dynamo is there
#: because DistributedDataParallel imports it (about 1 s on 2 cores) in every
#: rank otherwise. FASTSPAWN_ZYGOTE_PRELOAD="mod1,mod2" replaces the list.
DEFAULT_PRELOAD = tuple(
    m for m in os.environ.get("FASTSPAWN_ZYGOTE_PRELOAD", "torch,torch._dynamo").split(",") if m)


@contextlib.contextmanager
def _socket_of(conn: Connection) -> Iterator[socket.socket]:
    """The Connection's fd as a socket object (for sendfds/recvfds), still owned
    by the Connection."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.setblocking(True)  # as Connection needs (socket.setdefaulttimeout aside)
        yield sock
    finally:
        sock.detach()


def _send(conn: Connection, obj: Any, fds: Sequence[int] = ()) -> None:
    """Send one message, then ``fds`` in batches the kernel accepts."""
    conn.send_bytes(pickle.dumps(obj, protocol=5))
    if fds:
        with _socket_of(conn) as sock:
            for start in range(0, len(fds), MAX_FDS_PER_MESSAGE):
                sendfds(sock, list(fds[start:start + MAX_FDS_PER_MESSAGE]))


def _recv(conn: Connection, deadline: float | None = None) -> Any:
    """Receive one message; TimeoutError after ``deadline`` (time.monotonic())."""
    if deadline is not None and not conn.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError("timed out waiting for the fastspawn zygote")
    try:
        return pickle.loads(conn.recv_bytes())
    except EOFError:
        raise ConnectionError("the fastspawn zygote closed its connection") from None


def _recv_fds(conn: Connection, count: int) -> list[int]:
    """Receive the ``count`` fds that follow a request (see :func:`_send`)."""
    fds: list[int] = []
    try:
        with _socket_of(conn) as sock:
            while len(fds) < count:
                fds += recvfds(sock, min(MAX_FDS_PER_MESSAGE, count - len(fds)))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


# ---------------------------------------------------------------- launcher side


class ZygoteError(RuntimeError):
    """The zygote could not start or answer."""


class Zygote:
    """Launcher-side handle of one zygote process."""

    def __init__(self, preload: tuple[str, ...] = DEFAULT_PRELOAD):
        self.preload = tuple(preload)
        self.owner = os.getpid()
        self.lock = threading.Lock()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (parent, child):
            end.setblocking(True)  # whatever socket.setdefaulttimeout() says
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        code = ("import sys; from fastspawn._zygote import serve; "
                f"serve({child.fileno()}, {os.getpid()}, {list(self.preload)!r})")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child.fileno()],
                                         env=env, stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        self.ready = False
        self.pidfd = _guardian.watch(self.proc.pid)  # open until close() unwatches it

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def _failed(self, what: str) -> ZygoteError:
        code = self.proc.poll()
        state = f"exited with code {code}" if code is not None else "is still running"
        return ZygoteError(
            f"fastspawn zygote (pid {self.proc.pid}) {what}; it {state} (its output, if any, "
            f"is above). Preloaded modules: {', '.join(self.preload)}. "
            "Use start_method='fork' or 'spawn' to work without it.")

    def wait_ready(self, timeout: float) -> None:
        if self.ready:
            return
        deadline = time.monotonic() + timeout
        try:
            msg = _recv(self.conn, deadline)
        except (ConnectionError, OSError) as exc:
            raise self._failed(f"failed while starting ({exc})") from exc
        if not (isinstance(msg, dict) and msg.get("ready")):
            raise self._failed(f"sent an unexpected greeting {msg!r}")
        self.ready = True

    def release(self, pids: Sequence[int]) -> None:
        """The launcher is done with these ranks: the zygote may reap them (see above)."""
        if not pids or not self.alive():
            return  # a zygote that is gone has no ranks left to hold
        with self.lock:
            try:
                _send(self.conn, {"release": list(pids)})
            except OSError:
                pass  # it died meanwhile: its ranks went to init

    def spawn(self, request: dict[str, Any], fds: list[int], timeout: float) -> list[int]:
        with self.lock:
            self.wait_ready(timeout)
            try:
                _send(self.conn, dict(request, nfds=len(fds)), fds)
                reply = _recv(self.conn, time.monotonic() + timeout)
            except (ConnectionError, OSError) as exc:
                raise self._failed(f"stopped answering ({exc})") from exc
        if "error" in reply:
            raise ZygoteError(f"fastspawn zygote could not start the ranks: {reply['error']}")
        return list(reply["pids"])

    def close(self) -> None:
        if self.owner != os.getpid():
            return
        _guardian.unwatch(self.proc.pid, self.pidfd)  # before it is reaped (below)
        self.pidfd = -1
        try:
            self.conn.close()
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def get(preload: tuple[str, ...] = DEFAULT_PRELOAD) -> Zygote:
    """This process's zygote, started if needed (a forked rank gets its own)."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive() or _zygote.preload != tuple(preload):
            if _zygote is not None and _zygote.owner == os.getpid():
                _zygote.close()
            _zygote = Zygote(preload)
        return _zygote


def _forget_after_fork() -> None:
    # A forked child (a rank) starts its own zygote if it needs one.
    global _zygote
    _zygote = None


os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _close_at_exit() -> None:
    # Closing the socket ends the zygote's loop; without this, the interpreter's
    # exit leaves it to the death signal and warns about a running subprocess.
    if _zygote is not None:
        _zygote.close()


# ---------------------------------------------------------------- zygote side


def _wait_status(si: os.waitid_result) -> int:
    """A waitid() result as a wait(2) status (what the status pipe carries)."""
    if si.si_code == os.CLD_EXITED:
        return (si.si_status & 0xFF) << 8
    return (si.si_status & 0x7F) | (0x80 if si.si_code == os.CLD_DUMPED else 0)


class _Server:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(conn, selectors.EVENT_READ)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.status_of: dict[int, int] = {}  # running rank pid -> its request's status fd
        self.left: dict[int, int] = {}  # status fd -> ranks whose status is still to send
        self.held: set[int] = set()  # ranks that exited, kept unreaped until released
        self.released: set[int] = set()  # released while running: reap when they exit

    def run(self) -> None:
        while True:
            for key, _ in self.sel.select():
                if key.fileobj is self.conn:
                    if not self.handle_message():
                        return
                else:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
            self.reap()

    def reap(self) -> None:
        """Report every rank that exited since the last look; reap only released ones."""
        for pid in list(self.status_of):
            try:
                si = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped by someone else (nothing here does that)
                status = int(signal.SIGKILL)
            else:
                if si is None:
                    continue  # still running
                status = _wait_status(si)
                self.held.add(pid)
            fd = self.status_of.pop(pid)
            if pid in self.released:
                self._reap(pid)
            try:
                os.write(fd, struct.pack("=ii", pid, status))
            except OSError:
                pass  # the launcher is gone; nothing to tell
            self.left[fd] -= 1
            if self.left[fd] == 0:
                del self.left[fd]
                os.close(fd)

    def _reap(self, pid: int) -> None:
        self.released.discard(pid)
        self.held.discard(pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    def release(self, pids: list[int]) -> None:
        """The launcher closed the job: kill what is left of each rank's process group
        (the rank is our unreaped child, so the group id is still its), reap the ranks
        that exited, and the others as soon as they do."""
        for pid in pids:
            if pid not in self.held and pid not in self.status_of:
                continue  # not a rank of ours (or released already)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # no group of its own (set-up failed): the rank only
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if pid in self.held:
                self._reap(pid)
            else:
                self.released.add(pid)

    def handle_message(self) -> bool:
        try:
            req = _recv(self.conn)
            if isinstance(req, dict) and "release" in req:
                self.release(list(req["release"]))
                return True
            fds = _recv_fds(self.conn, req["nfds"])
        except (ConnectionError, EOFError, OSError, RuntimeError):
            return False  # the launcher is gone (or spoke nonsense): stop
        nprocs = req["nprocs"]
        status_fd, report_fds, user_fds = fds[0], fds[1:1 + nprocs], fds[1 + nprocs:]
        pids: list[int] = []
        try:
            for index in range(nprocs):
                pid = _C.fork_rank(True, signal.SIGKILL, report_fds[index])
                if pid == 0:
                    self.become_rank(index, req, report_fds[index], status_fd, user_fds,
                                     report_fds)
                pids.append(pid)
        except OSError as exc:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)  # our unreaped children: the pids are theirs
                os.waitpid(pid, 0)
            for fd in fds:
                os.close(fd)
            _send(self.conn, {"error": f"fork failed: {exc}"})
            return True
        for fd in report_fds + user_fds:
            os.close(fd)
        for pid in pids:
            self.status_of[pid] = status_fd
        self.left[status_fd] = nprocs
        _send(self.conn, {"pids": pids})
        return True

    def become_rank(self, index: int, req: dict[str, Any], report_fd: int, status_fd: int,
                    user_fds: list[int], report_fds: list[int]) -> None:
        # Undo the zygote's own set-up, then run the rank; never returns.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.sel.close()
        self.conn.close()
        for fd in [self.wake_r, self.wake_w, status_fd, *self.left] + [
                f for f in report_fds if f != report_fd]:
            try:
                os.close(fd)
            except OSError:
                pass
        os.environ.clear()
        os.environ.update(req["environ"])
        try:
            os.chdir(req["cwd"])
        except OSError:
            pass
        sys.path[:] = req["sys_path"]
        from . import _child, _pickle

        _pickle.set_inherited_fds(user_fds)
        _child.forked_rank_main(index, lambda: _pickle.loads(req["payload"]), report_fd,
                                req["env"][index], req["daemon"])


def serve(fd: int, launcher_pid: int, preload: list[str]) -> None:
    """Main loop of the zygote process."""
    _C.child_setup(True, signal.SIGKILL, launcher_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to forward
    conn = Connection(fd)
    import importlib

    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional module missing in this torch: go on
            print(f"fastspawn zygote: cannot preload {name}: {exc}", file=sys.stderr)
    # What every rank needs, imported once here.
    import fastspawn._child
    import fastspawn._pickle  # noqa: F401

    try:
        _send(conn, {"ready": True})
    except OSError:
        return  # the launcher left while we were importing: nothing to serve
    _Server(conn).run()
