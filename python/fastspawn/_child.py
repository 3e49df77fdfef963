"""What runs inside a rank: set the rank up, call ``fn(i, *args, **kwargs)``,
send the result or the error report to the launcher, exit."""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from . import _C, _mpcompat
from ._rendezvous import RankEnv
from ._report import encode_error, encode_result, write_all

Payload = tuple[Callable[..., Any], tuple, dict[str, Any]]


def run_rank(index: int, load: Callable[[], Payload], report_fd: int) -> int:
    """Run the rank function; report; return the exit code to use."""
    try:
        fn, args, kwargs = load()
        result = fn(index, *args, **kwargs)
    except KeyboardInterrupt:
        # Like torch: the launcher forwarded Ctrl-C; end quietly.
        return 0
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        print(code, file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001 - every error is reported
        # The launcher SIGTERMs the other ranks at the first failure (as torch
        # does); a rank that failed at the same moment still finishes its report.
        # SIGTERM stays blocked until the exit, which the report explains.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        write_all(report_fd, encode_error(exc))
        return 1
    write_all(report_fd, encode_result(result))
    return 0


def enter_rank_environment(env: RankEnv) -> None:
    """Set the rank's variables (None removes one) and its env:// rendezvous."""
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    from . import _rendezvous

    _rendezvous.install_rank_rendezvous()


def _become_rank(index: int, env: RankEnv, daemon: bool) -> None:
    """Make multiprocessing and the environment see a new process (after fork)."""
    enter_rank_environment(env)
    _mpcompat.become_new_process(f"fastspawn-rank-{index}", daemon)


def _exit_process(code: int) -> None:
    """Leave like multiprocessing's children do: flush Queues, then _exit."""
    try:
        _mpcompat.run_exit_handlers()
    finally:
        _mpcompat.flush_std_streams()
        os._exit(code)


def forked_rank_main(index: int, load: Callable[[], Payload], report_fd: int,
                     env: RankEnv, daemon: bool) -> None:
    """Entry point of a rank forked by fastspawn (directly or by the zygote)."""
    code = 1
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _become_rank(index, env, daemon)
        code = run_rank(index, load, report_fd)
    finally:
        try:
            os.close(report_fd)
        except OSError:
            pass
        _exit_process(code)


def mp_rank_main(index: int, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                 report_conn: Any, env: RankEnv, death_signal: int,
                 launcher_pid: int) -> None:
    """Entry point of a rank started by multiprocessing (spawn / forkserver)."""
    _C.child_setup(True, death_signal, launcher_pid)
    enter_rank_environment(env)
    code = run_rank(index, lambda: (fn, args, kwargs), report_conn.fileno())
    report_conn.close()
    if code != 0:
        sys.exit(code)
