"""spawn / start_processes / ProcessContext: the launcher.

The C supervisor (fastspawn._C.Group) starts or adopts the ranks, watches them
with pidfds in one epoll set, collects each rank's report, and stops them
(signal to each rank's process group, grace period, SIGKILL, reap). A guardian
process kills every rank's process group if this process dies, even by SIGKILL.

Only the job's processes are signalled: a rank's process group id is its pid,
which stays the job's only while the rank is unreaped. So every signal goes
through the C layer, which signals a group only while the rank's pidfd says it
is unreaped, and ranks are kept unreaped until the job's handle closes: forked
ranks by the supervisor, zygote ranks by the zygote (until :meth:`Zygote.release`),
spawn ranks by reading their status without reaping them. forkserver ranks are
reaped by the forkserver at once; their groups are signalled only while they run.
"""
from __future__ import annotations

import atexit
import errno
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import resource
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypedDict, Unpack, overload

from . import _C, _child, _mpcompat, _pickle, _rendezvous, _zygote
from ._errors import OOM_HINT, ProcessExitedException, ProcessRaisedException, RankFailure
from ._rankinfo import RankInfo
from ._rendezvous import RankEnv
from ._report import decode_error, decode_result

START_METHODS = ("auto", "fork", "zygote", "spawn", "forkserver")
#: fastspawn's default: fork when that is safe, else fork from the zygote.
DEFAULT_START_METHOD = "auto"
#: How long to wait for the zygote to import torch and answer (first call).
ZYGOTE_TIMEOUT = 300.0
#: torch's default time between SIGTERM and SIGKILL after a failure.
DEFAULT_TERMINATE_GRACE = 30.0
#: torch's switch for starting forkserver ranks in parallel (same name, same effect).
ENV_VAR_PARALLEL_START = "TORCH_MP_PARALLEL_START"

#: torch.multiprocessing.spawn's logger: the same warnings, so code that watches them works.
log = logging.getLogger("torch.multiprocessing.spawn")
#: Time between the forwarded Ctrl-C / SIGTERM and SIGKILL.
INTERRUPT_GRACE = 5.0

_live_contexts: weakref.WeakSet[ProcessContext] = weakref.WeakSet()


def _forget_contexts_after_fork() -> None:
    # In a new rank (forked by fastspawn, whose C fork paths call
    # PyOS_AfterFork_Child, or by anything else): the launcher's jobs are not ours.
    for ctx in list(_live_contexts):
        ctx._orphaned = True
    _live_contexts.clear()


os.register_at_fork(after_in_child=_forget_contexts_after_fork)


# ------------------------------------------------------------------ checks


def fork_safety_issues() -> list[str]:
    """Why forking this process could be unsafe (empty when it is safe)."""
    reasons = []
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                reasons.append("CUDA is initialised in this process (a forked child cannot use it)")
        except Exception:  # noqa: BLE001 - a torch that cannot say is not a reason
            pass
        dist = sys.modules.get("torch.distributed")
        try:
            if dist is not None and dist.is_available() and dist.is_initialized():
                reasons.append("a torch.distributed process group exists in this process")
        except Exception:  # noqa: BLE001 - likewise
            pass
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        reasons.append(f"other Python threads run ({', '.join(others[:3])}"
                       f"{', ...' if len(others) > 3 else ''}) and may hold locks")
    return reasons


def _resolve_start_method(start_method: str) -> str:
    if not isinstance(start_method, str) or start_method not in START_METHODS:
        raise ValueError(f"unknown start_method {start_method!r}: use one of "
                         f"{', '.join(repr(m) for m in START_METHODS)}")
    if start_method == "auto":
        return "zygote" if fork_safety_issues() else "fork"
    if start_method == "fork":
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise RuntimeError(
                "fastspawn: cannot fork: CUDA is initialised in this process, and a forked "
                "child cannot use CUDA. Use start_method='zygote' (fast: forks from a clean "
                "interpreter that already imported torch), 'spawn' or 'auto'.")
    return start_method


def _check_seconds(value: float | None, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 seconds or None, got {value!r}")


#: The supervisor's limit on ranks per launcher (checked before anything is built).
MAX_NPROCS = getattr(_C, "MAX_PROCS", 65536)


def _validate(fn: Any, args: Any, nprocs: Any, kwargs: Any,
              daemon: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(nprocs, bool) or not isinstance(nprocs, int):
        raise TypeError(f"nprocs must be an int, got {type(nprocs).__name__} {nprocs!r}")
    if nprocs < 1:
        raise ValueError(f"nprocs must be at least 1, got {nprocs}")
    if nprocs > MAX_NPROCS:
        raise ValueError(f"nprocs must be at most {MAX_NPROCS} per launcher, got {nprocs}; "
                         "for more ranks, run one launcher per node (nnodes=...)")
    if not callable(fn):
        raise TypeError(f"fn must be callable (called as fn(i, *args)), got "
                        f"{type(fn).__name__} {fn!r}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of arguments for fn, got {type(args).__name__}; "
                        "for one argument write args=(x,)")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    if not isinstance(daemon, bool):
        raise TypeError(f"daemon must be a bool, got {type(daemon).__name__}")
    return tuple(args), dict(kwargs or {})


# ------------------------------------------------------------------ processes


def _death_signal() -> int:
    """PR_SET_PDEATHSIG fires when the forking *thread* exits: only from the
    main thread does it mean "the launcher died" (the guardian covers the rest)."""
    return signal.SIGKILL if threading.current_thread() is threading.main_thread() else 0


def _wait_status(exitcode: int) -> int:
    """multiprocessing's exitcode (negative: signal) as a wait(2) status."""
    return (-exitcode) & 0x7F if exitcode < 0 else (exitcode & 0xFF) << 8


def _peek_wait_status(pid: int) -> int | None:
    """The wait status of our exited child ``pid``, read without reaping it (None if
    it has not exited, or someone reaped it already)."""
    try:
        si = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if si is None:
        return None
    if si.si_code == os.CLD_EXITED:
        return (si.si_status & 0xFF) << 8
    return si.si_status & 0x7F


class RankProcess:
    """A rank started by fork or the zygote, with what code uses of a
    ``multiprocessing.Process`` on ``ProcessContext.processes``: ``pid``, ``name``,
    ``daemon``, ``exitcode``, ``is_alive()``, ``join()``, ``sentinel``,
    ``terminate()``, ``kill()`` and ``close()``."""

    def __init__(self, context: ProcessContext, index: int, pid: int, daemon: bool):
        self._context = context
        self.index = index
        self.pid = pid
        self.name = f"fastspawn-rank-{index}"
        self.daemon = daemon
        self._sentinel: int | None = None
        self._close_sentinel: Callable[[], Any] | None = None

    @property
    def ident(self) -> int:
        """The pid (multiprocessing's alias)."""
        return self.pid

    @property
    def exitcode(self) -> int | None:
        """None while the rank runs; its exit code, or -signal if a signal ended it."""
        return self._context._exitcode(self.index)

    @property
    def sentinel(self) -> int:
        """An fd that becomes readable when the rank has ended (for
        ``multiprocessing.connection.wait``); valid until :meth:`close`."""
        if self._sentinel is None:
            fd = self._context._open_sentinel(self.index)
            self._sentinel = fd
            self._close_sentinel = weakref.finalize(self, os.close, fd)
        return self._sentinel

    def is_alive(self) -> bool:
        """Whether the rank still runs."""
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        """Wait until the rank has ended, or ``timeout`` seconds; see :attr:`exitcode`."""
        _check_seconds(timeout, "timeout")
        self._context._wait_for(self.index, timeout)

    def terminate(self) -> None:
        """SIGTERM to the rank's process group (nothing once it has ended)."""
        self._context._signal_one(self.index, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the rank's process group (nothing once it has ended)."""
        self._context._signal_one(self.index, signal.SIGKILL)

    def start(self) -> None:
        """Refused, as multiprocessing refuses a second start: the rank runs already."""
        raise AssertionError("cannot start a process twice")

    def close(self) -> None:
        """Release the sentinel; like multiprocessing, refused while the rank runs."""
        if self.is_alive():
            raise ValueError(f"Cannot close a process while it is still running. "
                             f"You should first call join() or terminate(). ({self!r})")
        if self._close_sentinel is not None:
            self._close_sentinel()
            self._sentinel = self._close_sentinel = None

    def __repr__(self) -> str:
        code = self.exitcode
        state = "started" if code is None else f"stopped exitcode={code}"
        return f"<RankProcess name={self.name!r} pid={self.pid} {state}>"


class _LauncherTerminated(BaseException):
    """SIGTERM arrived while joining: forward it, then die by it."""


class ProcessContext:
    """Handle of a group of running ranks (torch.multiprocessing's ProcessContext)."""

    def __init__(self, group: Any, nprocs: int, start_method: str, daemon: bool):
        self._group = group
        self.nprocs = nprocs
        self.start_method = start_method
        self.daemon = daemon
        self.processes: list[Any] = []
        self._mp_processes: list[Any] | None = None
        self._exit: list[int | None] = [None] * nprocs  # cached after close
        self._results: list[Any] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._orphaned = False
        self._rendezvous: _rendezvous.Rendezvous | None = None
        # The zygote that holds this job's ranks unreaped, and their pids (released at close).
        self._zygote: _zygote.Zygote | None = None
        self._zygote_pids: list[int] = []
        _live_contexts.add(self)

    # --- torch's API -------------------------------------------------
    @property
    def store_addr(self) -> str | None:
        """Where the ranks' store listens ("host:port"), while the ranks run."""
        r = self._rendezvous
        return None if r is None else r.store_addr

    def pids(self) -> list[int]:
        """The ranks' pids, by rank index."""
        return [int(p.pid) for p in self.processes]

    @property
    def sentinels(self) -> dict[int, int]:
        """``{process.sentinel: index}`` (torch's attribute of that name)."""
        return {p.sentinel: index for index, p in enumerate(self.processes)}

    def join(self, timeout: float | None = None, grace_period: float | None = None) -> bool:
        """Wait for the ranks.

        Returns True when every rank exited with code 0, False if ``timeout``
        seconds passed first. On the first failure, in torch's order: with
        ``grace_period``, the other ranks first get that long to exit on their
        own, then SIGTERM, then SIGKILL after another ``grace_period``; without
        it, SIGTERM at once and SIGKILL after 30 s (each logged on torch's
        ``torch.multiprocessing.spawn`` logger, with its wording). The signals
        go to each rank's process group. The failure is raised as
        ProcessRaisedException / ProcessExitedException, root cause first.
        Ctrl-C (or SIGTERM) while joining is forwarded to every rank.
        """
        _check_seconds(timeout, "timeout")
        _check_seconds(grace_period, "grace_period")
        if self._error is not None:
            raise self._error
        if self._closed:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        restore = self._install_sigterm_handler()
        try:
            while True:
                self._sync_external()
                if self._first_failure() is not None:
                    self._fail(grace_period)
                if self._group.running() == 0:
                    self._finish_success()
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._group.wait(remaining)
        except KeyboardInterrupt:
            self._abort(signal.SIGINT, grace_period)
            raise
        except _LauncherTerminated:
            self._abort(signal.SIGTERM, grace_period)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            restore = None
            os.kill(os.getpid(), signal.SIGTERM)
            raise
        finally:
            if restore is not None:
                restore()

    def results(self) -> list[Any]:
        """Each rank's return value (None where fn returned nothing), after join."""
        if self._error is not None:
            raise RuntimeError("the ranks failed; see the exception join() raised") from self._error
        if self._results is None:
            raise RuntimeError("results() needs the ranks to have finished: call join() until "
                               "it returns True first")
        return list(self._results)

    def terminate(self, grace_period: float = INTERRUPT_GRACE) -> None:
        """Stop every rank now (SIGTERM, grace period, SIGKILL) and reap them."""
        _check_seconds(grace_period, "grace_period")
        if not self._closed:
            self._abort(signal.SIGTERM, grace_period)

    # --- internals -----------------------------------------------------
    def _install_sigterm_handler(self) -> Callable[[], None] | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return None  # the program handles SIGTERM itself

        def on_sigterm(signum: int, frame: Any) -> None:
            raise _LauncherTerminated()

        def restore() -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        signal.signal(signal.SIGTERM, on_sigterm)
        return restore

    def _info(self, index: int) -> RankInfo:
        return RankInfo.from_c(self._group.info(index))

    def _exitcode_now(self, index: int) -> int | None:
        """multiprocessing's exitcode from the supervisor's record (None: running)."""
        return self._info(index).exitcode

    def _exitcode(self, index: int) -> int | None:
        if self._closed:
            return self._exit[index]
        self._group.wait(0)  # take in exits that happened since the last look
        self._sync_external()
        return self._exitcode_now(index)

    def _wait_for(self, index: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed and self._exitcode(index) is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            self._group.wait(remaining)

    def _open_sentinel(self, index: int) -> int:
        """A new fd that is (or becomes) readable once rank ``index`` has ended."""
        if not self._closed and self._exitcode(index) is None:
            pidfd = self._info(index).pidfd
            if pidfd >= 0:
                return os.dup(pidfd)  # the supervisor's, open until the group closes
            raise OSError(errno.ENOSYS, "no sentinel: this system has no pidfds")
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        os.close(write_end)  # ended already: a pipe at EOF is readable at once
        return read_end

    def _alive(self) -> list[int]:
        self._sync_external()
        return [i for i in range(self.nprocs) if self._exitcode_now(i) is None]

    def _signal_one(self, index: int, sig: int) -> None:
        # Through the C layer: the group only while the rank is unreaped (its pidfd).
        if self._closed or self._exitcode(index) is not None:
            return
        self._group.signal_rank(index, sig)

    def _sync_external(self) -> None:
        """Ranks multiprocessing reaps: take their exit status. A spawn rank is our
        child: its status is read without reaping it, so its group id stays the job's
        until close (multiprocessing reaps it then). A forkserver rank was reaped by
        the forkserver already: its status comes from multiprocessing."""
        if self._mp_processes is None or self._closed:
            return
        for index, proc in enumerate(self._mp_processes):
            info = self._info(index)
            if info.exited or not info.gone:
                continue
            status = _peek_wait_status(proc.pid) if self.start_method == "spawn" else None
            if status is None:
                proc.join(5.0)
                if proc.exitcode is not None:
                    status = _wait_status(proc.exitcode)
            if status is not None:
                self._group.set_exit(index, status)

    def _first_failure(self) -> int | None:
        first, first_order = None, None
        for index in range(self.nprocs):
            info = self._info(index)
            if info.failed and (first_order is None or info.order < first_order):
                first, first_order = index, info.order
        return first

    def _wait_until_done(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._group.running() > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._group.wait(remaining)
            self._sync_external()

    def _stop_all(self, sig: int, grace: float) -> None:
        self._group.terminate(sig, grace)
        if self._mp_processes is not None:
            for proc in self._mp_processes:
                proc.join(5.0)
                if proc.exitcode is None:
                    proc.kill()
                    proc.join(5.0)
            self._sync_external()

    def _fail(self, grace_period: float | None) -> None:
        # torch's order: the grace period first (others may exit on their own),
        # then SIGTERM, another grace period (30 s without one), then SIGKILL.
        if grace_period is not None:
            self._wait_until_done(grace_period)
        alive = self._alive()
        for index in alive:
            log.warning("Terminating process %s via signal SIGTERM", self.processes[index].pid)
        if alive:
            self._group.signal(signal.SIGTERM)
        self._wait_until_done(DEFAULT_TERMINATE_GRACE if grace_period is None else grace_period)
        for index in self._alive():
            log.warning("Unable to shutdown process %s via SIGTERM , forcefully exiting via "
                        "SIGKILL", self.processes[index].pid)
        self._stop_all(signal.SIGKILL, 0)  # and what is left of every rank's process group
        failures = self._collect_failures()
        self._error = _build_exception(failures)
        self._close()
        raise self._error

    def _abort(self, sig: int, grace_period: float | None) -> None:
        self._stop_all(sig, INTERRUPT_GRACE if grace_period is None else grace_period)
        self._close()

    def _collect_failures(self) -> list[RankFailure]:
        failures = []
        for index in range(self.nprocs):
            info = self._info(index)
            if not info.failed:
                continue
            traceback, exception = decode_error(self._group.report(index))
            if info.killed and traceback is None:
                continue  # stopped by us after another rank failed: not a cause
            sig = info.signal
            failures.append(RankFailure(
                index=index, pid=info.pid, exit_code=None if sig else info.exit_code,
                signal_name=(_C.signal_name(sig) or f"<Unknown signal {sig}>") if sig else None,
                traceback=traceback, exception=exception, order=info.order,
                killed_by_launcher=info.killed))
        failures.sort(key=lambda f: f.order)
        return failures

    def _finish_success(self) -> None:
        results = []
        for index in range(self.nprocs):
            value, note = decode_result(self._group.report(index))
            if note:
                warnings.warn(f"fastspawn: process {index}: {note}; its result is None",
                              RuntimeWarning, stacklevel=3)
            results.append(value)
        self._results = results
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        for index in range(self.nprocs):
            self._exit[index] = self._info(index).exitcode
        self._closed = True
        self._release_ranks()
        if self._mp_processes is not None:
            # multiprocessing keeps ended children (and their sentinel pipes) in its
            # registry until someone asks; torch's ProcessContext leaves them there.
            multiprocessing.active_children()
        if self._rendezvous is not None:
            self._rendezvous.close()  # the store outlived every rank; now it may go
            self._rendezvous = None
        _live_contexts.discard(self)

    def _release_ranks(self) -> None:
        # The group kills what runs and what is left of each rank's process group,
        # takes the ranks off the guardian and reaps those it forked; then the zygote
        # may reap its own (it kills what is left once more: they are its children).
        if self._group is not None:  # None: a context made without ranks (SpawnContext())
            self._group.close()
        zygote = getattr(self, "_zygote", None)  # (a finaliser may see a half-made context)
        if zygote is not None:
            zygote.release(self._zygote_pids)
            self._zygote = None

    def __del__(self) -> None:
        # An abandoned context must not leave ranks behind, nor zygote ranks unreaped.
        if not getattr(self, "_closed", True) and not getattr(self, "_orphaned", False):
            self._closed = True
            self._release_ranks()


class SpawnContext(ProcessContext):
    """torch's deprecated name for :class:`ProcessContext`."""

    def __init__(self, *args: Any, **kwargs: Any):
        warnings.warn("SpawnContext is renamed to ProcessContext since 1.4 release.",
                      stacklevel=2)
        super().__init__(*args, **kwargs)


def _build_exception(failures: list[RankFailure]) -> BaseException:
    root = failures[0]
    if root.traceback is not None:
        msg = f"\n\n-- Process {root.index:d} terminated with the following error:\n"
        msg += root.traceback
        exc: BaseException = ProcessRaisedException(msg, root.index, root.pid)
    elif root.signal_name is not None:
        msg = f"process {root.index:d} terminated with signal {root.signal_name}"
        signum = getattr(signal.Signals, root.signal_name, None) if root.signal_name.startswith(
            "SIG") else None
        if root.signal_name == "SIGKILL" and not root.killed_by_launcher:
            msg += f"\nHint: {OOM_HINT}"
        exc = ProcessExitedException(msg, root.index, root.pid,
                                     exit_code=-int(signum) if signum is not None else -1,
                                     signal_name=root.signal_name)
    else:
        assert root.exit_code is not None  # no traceback, no signal: it exited with a code
        msg = f"process {root.index:d} terminated with exit code {root.exit_code:d}"
        exc = ProcessExitedException(msg, root.index, root.pid, exit_code=root.exit_code)
    exc.failures = failures  # type: ignore[attr-defined]
    if len(failures) > 1:
        lines = "\n".join(f"  {f.summary()}" for f in failures)
        exc.add_note(f"fastspawn: {len(failures)} processes failed, root cause first:\n{lines}")
    return exc


# ------------------------------------------------------------------ starting


def _start_forked(fn: Callable, args: tuple, kwargs: dict, nprocs: int, daemon: bool,
                  envs: list[RankEnv]) -> ProcessContext:
    group = _C.Group(nprocs)
    ctx = ProcessContext(group, nprocs, "fork", daemon)
    death = _death_signal()
    # As multiprocessing does: unflushed output would otherwise be printed by
    # every rank as well.
    _mpcompat.flush_std_streams()
    try:
        for index in range(nprocs):
            pid, report_fd = group.fork(index, True, death)
            if pid == 0:  # the new rank; never returns
                _child.forked_rank_main(index, lambda: (fn, args, kwargs), report_fd,
                                        envs[index], daemon)
            ctx.processes.append(RankProcess(ctx, index, pid, daemon))
            group.guard(index)  # with its pidfd; the group's close unregisters it
    except BaseException:
        ctx._abort(signal.SIGKILL, 0)
        raise
    return ctx


def _start_zygote(fn: Callable, args: tuple, kwargs: dict, nprocs: int, daemon: bool,
                  envs: list[RankEnv]) -> ProcessContext:
    payload, user_fds = _pickle.dumps_with_fds((fn, args, kwargs), "zygote")
    zygote = _zygote.get()
    group = _C.Group(nprocs)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    report_fds: list[int] = []
    try:
        for index in range(nprocs):
            report_fds.append(group.prepare_report(index))
        request = {"nprocs": nprocs, "payload": payload, "env": envs, "daemon": daemon,
                   "environ": dict(os.environ), "cwd": os.getcwd(), "sys_path": list(sys.path)}
        pids = zygote.spawn(request, [status_w] + report_fds + user_fds, ZYGOTE_TIMEOUT)
    except BaseException:
        os.close(status_r)
        group.close()
        raise
    finally:
        os.close(status_w)
        for fd in report_fds:
            os.close(fd)
    # The job handle exists only once the ranks do: a failed request leaves no
    # half-made context for the exit handler to join.
    ctx = ProcessContext(group, nprocs, "zygote", daemon)
    # The zygote keeps the ranks unreaped until the context releases them at close.
    ctx._zygote, ctx._zygote_pids = zygote, list(pids)
    try:
        try:
            group.attach_status_fd(status_r)
        except BaseException:
            os.close(status_r)
            raise
        for index, pid in enumerate(pids):
            group.adopt(index, pid, False)
            ctx.processes.append(RankProcess(ctx, index, pid, daemon))
            group.guard(index)
    except BaseException:
        ctx._abort(signal.SIGKILL, 0)  # the release kills the zygote ranks not adopted yet
        raise
    return ctx


def _start_mp(fn: Callable, args: tuple, kwargs: dict, nprocs: int, daemon: bool,
              envs: list[RankEnv], method: str) -> ProcessContext:
    mp: multiprocessing.context.SpawnContext | multiprocessing.context.ForkServerContext = (
        multiprocessing.get_context("spawn") if method == "spawn"
        else multiprocessing.get_context("forkserver"))
    send_fn = _pickle.ByValue(fn) if _pickle.needs_by_value(fn) else fn
    _pickle.check_picklable_for_mp(send_fn, args, kwargs, method)
    group = _C.Group(nprocs)
    ctx = ProcessContext(group, nprocs, method, daemon)
    ctx._mp_processes = []
    death = _death_signal()
    launcher = os.getpid() if method == "spawn" else 0
    # As torch: TORCH_MP_PARALLEL_START=1 starts forkserver ranks from a thread pool.
    parallel = method == "forkserver" and os.environ.get(ENV_VAR_PARALLEL_START, "0") == "1"
    if parallel:
        log.info("Starting processes in parallel.")
    conns: list[Any] = []
    procs: list[Any] = [None] * nprocs

    def start(index: int) -> None:
        proc = procs[index] = mp.Process(
            target=_child.mp_rank_main, name=f"fastspawn-rank-{index}",
            args=(index, send_fn, args, kwargs, conns[index], envs[index], death, launcher),
            daemon=daemon)
        proc.start()
        assert proc.pid is not None  # started
        # At once: the next start() reaps finished children (multiprocessing's cleanup),
        # and the pid is trusted only here, to open the pidfd the group then goes by.
        group.adopt(index, proc.pid, False)
        group.guard(index)

    error: BaseException | None = None
    try:
        for index in range(nprocs):
            conns.append(multiprocessing.connection.Connection(group.prepare_report(index),
                                                               readable=False))
        if parallel:
            with ThreadPoolExecutor(max_workers=nprocs) as pool:
                for future in [pool.submit(start, index) for index in range(nprocs)]:
                    future.result()
        else:
            for index in range(nprocs):
                start(index)
    except BaseException as exc:  # noqa: BLE001 - the ranks that did start are stopped first
        error = exc
    finally:
        for conn in conns:
            conn.close()
    try:
        for proc in procs:
            if proc is not None and proc.pid is not None:
                ctx._mp_processes.append(proc)
                ctx.processes.append(proc)
        if error is not None:
            raise error
    except BaseException:
        ctx._abort(signal.SIGKILL, 0)
        raise
    return ctx


class StartOptions(TypedDict, total=False):
    """The keyword-only options of :func:`start_processes` (and :func:`spawn`)."""

    kwargs: dict[str, Any] | None
    nnodes: int | None
    node_rank: int | None
    master_addr: str | None
    master_port: int | None
    store_token: str | None
    rdzv_timeout: float | None


#: Launcher fds per local rank (pidfd, report pipe, zygote status share, guardian
#: registration) and per store client, with room for the store's own and Python's.
_FDS_PER_RANK = 4
_FDS_PER_STORE_CLIENT = 2
_FDS_BASE = 128


def _make_fd_room(nprocs: int, placement: _rendezvous.Placement) -> None:
    """Raise the soft open-file limit towards the hard one when the job needs more.

    The usual soft limit (1024) fits about 250 local ranks, and node 0's store of a
    large multi-node job holds a connection per rank of every node; the store sizes
    its client cap from the limit it finds. Never lowers it; fails quietly.
    """
    need = _FDS_BASE + _FDS_PER_RANK * nprocs
    if placement.node_rank == 0:
        need += _FDS_PER_STORE_CLIENT * nprocs * placement.nnodes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                pass


# join=True (the default) returns the results, join=False the ProcessContext.
@overload
def start_processes(fn: Callable[..., Any], args: Sequence[Any] = ..., nprocs: int = ...,
                    join: Literal[True] = ..., daemon: bool = ..., start_method: str = ...,
                    **options: Unpack[StartOptions]) -> list[Any]: ...
@overload
def start_processes(fn: Callable[..., Any], args: Sequence[Any], nprocs: int,
                    join: Literal[False], daemon: bool = ..., start_method: str = ...,
                    **options: Unpack[StartOptions]) -> ProcessContext: ...
@overload
def start_processes(fn: Callable[..., Any], args: Sequence[Any] = ..., nprocs: int = ..., *,
                    join: Literal[False], daemon: bool = ..., start_method: str = ...,
                    **options: Unpack[StartOptions]) -> ProcessContext: ...
@overload
def start_processes(fn: Callable[..., Any], args: Sequence[Any] = ..., nprocs: int = ...,
                    join: bool = ..., daemon: bool = ..., start_method: str = ...,
                    **options: Unpack[StartOptions]) -> list[Any] | ProcessContext: ...
def start_processes(fn: Callable[..., Any], args: Sequence[Any] = (), nprocs: int = 1,
                    join: bool = True, daemon: bool = False,
                    start_method: str = DEFAULT_START_METHOD, *,
                    kwargs: dict[str, Any] | None = None, nnodes: int | None = None,
                    node_rank: int | None = None, master_addr: str | None = None,
                    master_port: int | None = None, store_token: str | None = None,
                    rdzv_timeout: float | None = None) -> list[Any] | ProcessContext:
    """Start ``nprocs`` processes running ``fn(i, *args, **kwargs)``.

    Returns the list of each rank's return value when ``join`` is True, else a
    :class:`ProcessContext`. ``start_method``: ``"auto"`` (default: fork when
    this process is fork-safe, else the zygote), ``"fork"``, ``"zygote"``,
    ``"spawn"`` or ``"forkserver"``.

    The launcher hosts the ranks' rendezvous store; ``fastspawn.init_process_group()``
    in a rank needs no arguments. For several nodes, run one launcher per node:
    ``nnodes``/``node_rank``/``master_addr``/``master_port`` come from these
    arguments or from SLURM, OpenMPI, PMI or torchrun's environment, and
    ``store_token`` (or FASTSPAWN_JOB_TOKEN) must be the same on every node.
    The rank index ``i`` passed to ``fn`` is the local rank; RANK in the
    environment is ``node_rank * nprocs + i``.
    """
    call_args, call_kwargs = _validate(fn, args, nprocs, kwargs, daemon)
    if not isinstance(join, bool):
        raise TypeError(f"join must be a bool, got {type(join).__name__}")
    _check_seconds(rdzv_timeout, "rdzv_timeout")
    method = _resolve_start_method(start_method)
    placement = _rendezvous.detect_placement(nnodes, node_rank, master_addr, master_port)
    _make_fd_room(nprocs, placement)
    rdzv = _rendezvous.Rendezvous(nprocs, placement, store_token, rdzv_timeout)
    envs = [rdzv.rank_environment(i) for i in range(nprocs)]
    try:
        if method == "fork":
            ctx = _start_forked(fn, call_args, call_kwargs, nprocs, daemon, envs)
        elif method == "zygote":
            ctx = _start_zygote(fn, call_args, call_kwargs, nprocs, daemon, envs)
        else:
            ctx = _start_mp(fn, call_args, call_kwargs, nprocs, daemon, envs, method)
    except BaseException:
        rdzv.close()
        raise
    ctx._rendezvous = rdzv
    if not join:
        return ctx
    while not ctx.join():
        pass
    return ctx.results()


@overload
def spawn(fn: Callable[..., Any], args: Sequence[Any] = ..., nprocs: int = ...,
          join: Literal[True] = ..., daemon: bool = ..., start_method: str = ...,
          **options: Unpack[StartOptions]) -> list[Any]: ...
@overload
def spawn(fn: Callable[..., Any], args: Sequence[Any], nprocs: int, join: Literal[False],
          daemon: bool = ..., start_method: str = ...,
          **options: Unpack[StartOptions]) -> ProcessContext: ...
@overload
def spawn(fn: Callable[..., Any], args: Sequence[Any] = ..., nprocs: int = ..., *,
          join: Literal[False], daemon: bool = ..., start_method: str = ...,
          **options: Unpack[StartOptions]) -> ProcessContext: ...
@overload
def spawn(fn: Callable[..., Any], args: Sequence[Any] = ..., nprocs: int = ...,
          join: bool = ..., daemon: bool = ..., start_method: str = ...,
          **options: Unpack[StartOptions]) -> list[Any] | ProcessContext: ...
def spawn(fn: Callable[..., Any], args: Sequence[Any] = (), nprocs: int = 1, join: bool = True,
          daemon: bool = False, start_method: str = DEFAULT_START_METHOD,
          **options: Unpack[StartOptions]) -> list[Any] | ProcessContext:
    """Drop-in for ``torch.multiprocessing.spawn``: run ``fn(i, *args)`` in
    ``nprocs`` processes. Unlike torch's, any start method is accepted (default
    ``"auto"``), ``kwargs`` are passed on, and when ``join`` is True the list of
    return values is returned (torch returns None). Keyword options are those
    of :func:`start_processes`."""
    return start_processes(fn, args, nprocs, join, daemon, start_method, **options)


def start_zygote() -> None:
    """Start the zygote now (it imports torch in the background), so the first
    ``start_method="zygote"``/``"auto"`` spawn that needs it does not wait."""
    _zygote.get()


@atexit.register
def _join_at_exit() -> None:
    # Like multiprocessing: wait for non-daemonic ranks, stop daemonic ones.
    for ctx in list(_live_contexts):
        if ctx._orphaned or ctx._closed:
            continue
        try:
            if ctx.daemon:
                ctx.terminate()
            else:
                while not ctx.join():
                    pass
        except BaseException as exc:  # noqa: BLE001 - report, keep cleaning up
            print(f"fastspawn: at exit: {exc}", file=sys.stderr)


__all__ = (
    "DEFAULT_START_METHOD",
    "ENV_VAR_PARALLEL_START",
    "START_METHODS",
    "ProcessContext",
    "RankProcess",
    "SpawnContext",
    "fork_safety_issues",
    "spawn",
    "start_processes",
    "start_zygote",
)
