"""The thin CPython binding (csrc/python/): shapes and conversions the Python layer relies on."""
import os
import select
import signal
import threading

import pytest

from fastspawn import _C


def _fork_one(group, index, code=0):
    pid, _report_fd = group.fork(index, True, signal.SIGKILL)
    if pid == 0:
        os._exit(code)
    return pid


def test_info_is_a_named_7_tuple_with_pidfd_and_setup_error():
    group = _C.Group(1)
    try:
        info = group.info(0)
        assert isinstance(info, tuple) and isinstance(info, _C.RankInfo) and len(info) == 7
        assert info.pid == 0 and info.state == 0 and info.pidfd == -1 and info.setup_error is None
        pid = _fork_one(group, 0, code=3)
        running = group.info(0)
        # The positional shape of the old 7-tuple still unpacks.
        p, state, code, sig, order, killed, _gone = running
        assert (p, state, order, killed) == (pid, _C.PROC_RUNNING, 0, 0)
        assert running.pid == pid and running.exit_code == code and running.signal == sig
        assert running.pidfd >= 0
        # A dup of the pidfd is a sentinel: readable once the rank exited.
        sentinel = os.dup(running.pidfd)
        try:
            assert select.select([sentinel], [], [], 10)[0] == [sentinel]
        finally:
            os.close(sentinel)
        while group.running():
            group.wait(5)
        done = group.info(0)
        assert (done.state, done.exit_code, done.order, done.gone) == (_C.PROC_EXITED, 3, 1, 1)
        assert done.pidfd >= 0 and done.setup_error is None  # open until the group closes
        # Not reaped: the zombie keeps its pid (its group's id) the job's until the close.
        assert os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    finally:
        group.close()
    with pytest.raises(ChildProcessError):  # the close reaped it
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)


@pytest.mark.parametrize("step, what", [("setpgid", "setpgid(0, 0)"),
                                        ("pdeathsig", "prctl(PR_SET_PDEATHSIG)")])
def test_failed_child_setup_names_the_step(monkeypatch, step, what):
    group = _C.Group(1)
    try:
        monkeypatch.setenv("FASTSPAWN_TEST_CHILD_SETUP_FAIL", step)
        _fork_one(group, 0)  # the child never returns from a failed set-up
        monkeypatch.delenv("FASTSPAWN_TEST_CHILD_SETUP_FAIL")
        while group.running():
            group.wait(5)
        info = group.info(0)
        assert info.exit_code == 127 and group.report(0) == b""
        assert what in info.setup_error and os.strerror(22) in info.setup_error
    finally:
        group.close()


def test_one_timeout_conversion():
    group = _C.Group(1)
    try:
        assert group.wait(0) == 0 and group.wait(0.0004) == 0 and group.wait(float("inf")) == 0
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
            group.wait(-1)
        with pytest.raises(ValueError, match="timeout"):
            group.wait(float("nan"))
        with pytest.raises(TypeError, match="timeout must be None or a number of seconds"):
            group.wait("soon")
    finally:
        group.close()
    with pytest.raises(ValueError, match="timeout must be None or a number of seconds > 0"):
        _C.Comm(None, 0, 1, timeout=0)
    comm = _C.Comm(None, 0, 1, timeout=float("inf"), connect_timeout=0.0001)
    try:
        comm.join()
        comm.run(_C.COLL_BARRIER, 0, 0, 0, 0, 0, 0)
        with pytest.raises(ValueError, match=">= 0"):
            comm.wait(1, -0.5)
    finally:
        comm.close()


def _both_join(r0, r1):
    t = threading.Thread(target=r0.join)
    t.start()
    try:
        r1.join()
    finally:
        t.join()


@pytest.mark.parametrize("shm", ["memfd", "named"])
def test_comm_is_created_by_rank_0_and_opened_by_the_others(shm, no_leaks):
    with pytest.raises(ValueError, match="handle=None"):
        _C.Comm("memfd:1:2:00", 0, 2)
    with pytest.raises(ValueError, match="handle=None"):
        _C.Comm(None, 1, 2)
    with pytest.raises(ValueError, match="shm must be"):
        _C.Comm(None, 0, 1, shm="tmpfs")
    r0 = _C.Comm(None, 0, 2, shm=shm, connect_timeout=10)
    try:
        handle = r0.handle
        # The cookie ends the handle (csrc/lib/shm.h): another one names another segment.
        forged = handle[:-1] + ("1" if handle[-1] == "0" else "0")
        with pytest.raises(PermissionError, match="cookie mismatch"):
            _C.Comm(forged, 1, 2)
        r1 = _C.Comm(handle, 1, 2, connect_timeout=10)
        try:
            assert r1.handle == handle
            with pytest.raises(ValueError, match="fs_comm_join"):
                r1.run(_C.COLL_BARRIER, 0, 0, 0, 0, 0, 0)
            _both_join(r0, r1)
            with pytest.raises(ValueError, match="joined already"):
                r1.join()
        finally:
            r1.close()
    finally:
        r0.close()
    with pytest.raises(RuntimeError, match="rank 0"):
        _C.Comm(handle, 1, 2)  # rank 0's segment is gone with it: a clear error
