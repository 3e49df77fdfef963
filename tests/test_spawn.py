"""fastspawn.spawn / start_processes: a drop-in for torch.multiprocessing.spawn."""
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch.multiprocessing as torch_mp

import fastspawn
from conftest import ALL_METHODS, FAST_METHODS, children_of, pid_alive, run_python, wait_gone


# Rank functions live at module level so every start method can find them.
def times(i, x):
    return i * x


def with_kwargs(i, a, *, scale=1):
    return (i + a) * scale


def env_of(i):
    return {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}


def raise_on(i, bad):
    if i == bad:
        raise ValueError(f"boom from {i}")
    time.sleep(30)


def all_raise(i):
    raise RuntimeError(f"rank {i} failed")


def raise_when_told(i, events):
    assert events[i].wait(60)
    raise RuntimeError(f"rank {i} failed")


def exit_with(i, code):
    if i == 0:
        sys.exit(code)
    time.sleep(30)


def die_by(i, sig):
    if i == 0:
        os.kill(os.getpid(), sig)
        time.sleep(5)
    time.sleep(30)


def return_at_once_or_when_told(i, go):
    if i:  # rank 0 returns at once, the others once the test says so
        assert go.wait(60)
    return i


def put_rank(i, q):
    q.put((i, os.getpid()))


def nested(i):
    return fastspawn.spawn(times, args=(10 + i,), nprocs=2, start_method="fork")


def ignore_sigterm(i, ignoring):
    if i == 0:  # fail once rank 1 ignores SIGTERM
        assert ignoring.wait(60)
        raise ValueError("rank 0 fails")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ignoring.set()
    time.sleep(60)


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.lock = threading.Lock()


def raise_unpicklable(i):
    raise Unpicklable("cannot pickle me", 2)


def huge_traceback(i):
    raise ValueError("x" * 300_000)


def current_process_info(i):
    import multiprocessing
    p = multiprocessing.current_process()
    return p.name, p.daemon


# ----------------------------------------------------------------- results


@pytest.mark.parametrize("method", ALL_METHODS + ["auto"])
def test_returns_each_rank_result(method):
    assert fastspawn.spawn(times, args=(3,), nprocs=3, start_method=method) == [0, 3, 6]


@pytest.mark.parametrize("method", FAST_METHODS)
def test_kwargs_and_env(method, no_leaks):
    assert fastspawn.spawn(with_kwargs, args=(1,), kwargs={"scale": 10}, nprocs=2,
                           start_method=method) == [10, 20]
    envs = fastspawn.spawn(env_of, nprocs=2, start_method=method)
    assert envs == [{"RANK": str(i), "LOCAL_RANK": str(i), "WORLD_SIZE": "2",
                     "LOCAL_WORLD_SIZE": "2"} for i in range(2)]
    assert "RANK" not in os.environ  # the launcher's own environment is untouched


def test_start_processes_matches_torch_signature(no_leaks):
    ctx = fastspawn.start_processes(times, (2,), 2, False, False, "fork")
    assert isinstance(ctx, fastspawn.ProcessContext)
    assert len(ctx.pids()) == 2 and all(p > 0 for p in ctx.pids())
    while not ctx.join():
        pass
    assert ctx.results() == [0, 2]
    assert [p.exitcode for p in ctx.processes] == [0, 0]


@pytest.mark.parametrize("method", FAST_METHODS)
def test_daemon_flag_and_process_name(method):
    out = fastspawn.spawn(current_process_info, nprocs=2, daemon=True, start_method=method)
    assert out == [("fastspawn-rank-0", True), ("fastspawn-rank-1", True)]


# ----------------------------------------------------------------- failures


@pytest.mark.parametrize("method", ALL_METHODS)
def test_exception_in_one_rank(method):
    t0 = time.monotonic()
    with pytest.raises(fastspawn.ProcessRaisedException) as info:
        fastspawn.spawn(raise_on, args=(1,), nprocs=3, start_method=method)
    err = info.value
    assert isinstance(err, torch_mp.ProcessRaisedException)  # torch's except clauses catch it
    assert err.error_index == 1 and err.error_pid > 0
    msg = str(err)
    assert msg.startswith("\n\n-- Process 1 terminated with the following error:\nTraceback")
    assert msg.rstrip().splitlines()[-1] == "ValueError: boom from 1"
    assert 'raise ValueError(f"boom from {i}")' in msg  # the source line: file kept
    assert [f.index for f in err.failures] == [1]
    assert isinstance(err.failures[0].exception, ValueError)
    assert time.monotonic() - t0 < 25, "the other ranks were not stopped"


def join_with_grace(fn, args, nprocs, method, grace_period):
    ctx = fastspawn.start_processes(fn, args, nprocs, join=False, start_method=method)
    while not ctx.join(grace_period=grace_period):
        pass
    return ctx


@pytest.mark.parametrize("method", FAST_METHODS)
def test_every_rank_fails_all_are_reported(method, no_leaks):
    # With a grace period the others may fail on their own first (torch's order),
    # and every failure is reported.
    with pytest.raises(fastspawn.ProcessRaisedException) as info:
        join_with_grace(all_raise, (), 3, method, grace_period=20)
    err = info.value
    assert sorted(f.index for f in err.failures) == [0, 1, 2]
    assert err.failures[0].index == err.error_index  # root cause first
    assert f"RuntimeError: rank {err.error_index} failed" in str(err)
    notes = "\n".join(getattr(err, "__notes__", []))
    assert "3 processes failed, root cause first" in notes
    for i in range(3):
        assert f"process {i} (pid" in notes


def test_root_cause_is_the_first_to_fail(no_leaks):
    # Rank i fails only once rank i - 1 has been seen to exit: the order is known.
    events = [fastspawn.get_context("fork").Event() for _ in range(3)]
    ctx = fastspawn.start_processes(raise_when_told, (events,), 3, join=False,
                                    start_method="fork")
    for index, told in enumerate(events):
        told.set()
        ctx.processes[index].join(timeout=30)
        assert ctx.processes[index].exitcode == 1
    with pytest.raises(fastspawn.ProcessRaisedException) as info:
        ctx.join(grace_period=20)
    err = info.value
    assert err.error_index == 0
    assert [f.index for f in err.failures] == [0, 1, 2]


@pytest.mark.parametrize("method", FAST_METHODS)
def test_exit_code(method, no_leaks):
    with pytest.raises(fastspawn.ProcessExitedException) as info:
        fastspawn.spawn(exit_with, args=(123,), nprocs=2, start_method=method)
    err = info.value
    assert isinstance(err, torch_mp.ProcessExitedException)
    assert str(err) == "process 0 terminated with exit code 123"
    assert err.exit_code == 123 and err.signal_name is None and err.error_index == 0


@pytest.mark.parametrize("method", FAST_METHODS)
def test_signal_abort(method, no_leaks):
    with pytest.raises(fastspawn.ProcessExitedException) as info:
        fastspawn.spawn(die_by, args=(signal.SIGABRT,), nprocs=2, start_method=method)
    err = info.value
    assert str(err) == "process 0 terminated with signal SIGABRT"
    assert err.signal_name == "SIGABRT" and err.exit_code == -signal.SIGABRT


def test_sigkill_gets_oom_hint(no_leaks):
    with pytest.raises(fastspawn.ProcessExitedException) as info:
        fastspawn.spawn(die_by, args=(signal.SIGKILL,), nprocs=2, start_method="fork")
    msg = str(info.value)
    assert msg.startswith("process 0 terminated with signal SIGKILL")
    assert "out-of-memory killer" in msg


def test_unpicklable_exception_keeps_traceback(no_leaks):
    with pytest.raises(fastspawn.ProcessRaisedException) as info:
        fastspawn.spawn(raise_unpicklable, nprocs=1, start_method="fork")
    assert "Unpicklable: cannot pickle me" in str(info.value)


def test_large_traceback_does_not_block(no_leaks):
    with pytest.raises(fastspawn.ProcessRaisedException) as info:
        fastspawn.spawn(huge_traceback, nprocs=2, start_method="fork")
    assert "x" * 300_000 in str(info.value)


def test_grace_period_then_sigkill(no_leaks):
    ignoring = fastspawn.get_context("fork").Event()
    t0 = time.monotonic()
    with pytest.raises(fastspawn.ProcessRaisedException):
        ctx = fastspawn.start_processes(ignore_sigterm, (ignoring,), nprocs=2, join=False,
                                        start_method="fork")
        while not ctx.join(grace_period=0.5):
            pass
    # rank 1 ignores SIGTERM: it must be SIGKILLed after ~2 x 0.5 s, not after 60 s.
    assert time.monotonic() - t0 < 10
    assert ctx.processes[1].exitcode == -signal.SIGKILL


# ----------------------------------------------------------------- joining


def test_non_blocking_join(no_leaks):
    go = fastspawn.get_context("fork").Event()
    ctx = fastspawn.spawn(return_at_once_or_when_told, args=(go,), nprocs=2, join=False,
                          start_method="fork")
    assert ctx.join(timeout=0) is False
    assert ctx.join(timeout=0.05) is False
    with pytest.raises(RuntimeError, match="call join"):
        ctx.results()
    go.set()
    deadline = time.monotonic() + 20
    while not ctx.join(timeout=0.1):
        assert time.monotonic() < deadline
    assert ctx.results() == [0, 1]
    assert ctx.join() is True  # joining again is harmless


def test_early_return_of_some_ranks(no_leaks):
    go = fastspawn.get_context("fork").Event()
    ctx = fastspawn.spawn(return_at_once_or_when_told, args=(go,), nprocs=3, join=False,
                          start_method="fork")
    ctx.processes[0].join(timeout=20)
    assert ctx.processes[0].exitcode == 0 and ctx.processes[1].is_alive()
    go.set()
    assert ctx.join(timeout=20)
    assert ctx.results() == [0, 1, 2]


# ----------------------------------------------------------------- arguments


@pytest.mark.parametrize("method", ALL_METHODS)
def test_queue_argument(method):
    ctx = fastspawn.get_context(method)
    q = ctx.Queue()
    fastspawn.spawn(put_rank, args=(q,), nprocs=2, start_method=method)
    got = sorted(q.get(timeout=10) for _ in range(2))
    assert [i for i, _ in got] == [0, 1]


@pytest.mark.parametrize("method", FAST_METHODS)
def test_simple_queue_argument(method):
    q = fastspawn.get_context(method).SimpleQueue()
    fastspawn.spawn(put_rank, args=(q,), nprocs=2, start_method=method)
    assert sorted(q.get()[0] for _ in range(2)) == [0, 1]


def test_torch_queue_from_torch_context():
    q = torch_mp.get_context("spawn").SimpleQueue()
    fastspawn.spawn(put_rank, args=(q,), nprocs=1, start_method="zygote")
    assert q.get()[0] == 0


def test_nested_spawn():
    assert fastspawn.spawn(nested, nprocs=2, start_method="fork") == [[0, 10], [0, 11]]


@pytest.mark.parametrize("method", ["fork", "zygote",
                                    pytest.param("spawn", marks=pytest.mark.slow)])
def test_function_from_python_c(method):
    code = f"""
import fastspawn
SCALE = 7
def work(i, x):
    return i * x * SCALE
print(fastspawn.spawn(work, args=(2,), nprocs=2, start_method={method!r}))
print(fastspawn.spawn(lambda i: i + 100, nprocs=2, start_method={method!r}))
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[0, 14]", "[100, 101]"]


# ----------------------------------------------------------------- start methods


def test_auto_forks_when_safe_and_uses_zygote_otherwise():
    assert fastspawn.fork_safety_issues() == []
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="busy-helper")
    t.start()
    try:
        issues = fastspawn.fork_safety_issues()
        assert any("busy-helper" in s for s in issues)
        assert fastspawn._launch._resolve_start_method("auto") == "zygote"
        assert fastspawn.spawn(times, args=(5,), nprocs=2) == [0, 5]
    finally:
        stop.set()
        t.join(5)
    assert fastspawn._launch._resolve_start_method("auto") == "fork"


def test_fork_refused_when_cuda_initialised(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match=r"CUDA is initialised.*start_method='zygote'"):
        fastspawn.spawn(times, args=(1,), nprocs=1, start_method="fork")
    assert fastspawn._launch._resolve_start_method("auto") == "zygote"


def test_zygote_messages_carry_any_number_of_fds():
    # sendfds takes at most 253 fds (SCM_MAX_FD) a message: more go in batches.
    import multiprocessing.connection
    import socket

    from fastspawn import _zygote

    a, b = socket.socketpair()
    left, right = (multiprocessing.connection.Connection(s.detach()) for s in (a, b))
    pipes = [os.pipe() for _ in range(2 * _zygote.MAX_FDS_PER_MESSAGE + 7)]
    got = []
    try:
        sent = [r for r, _ in pipes]
        _zygote._send(left, {"nfds": len(sent)}, sent)
        request = _zygote._recv(right, time.monotonic() + 10)
        got = _zygote._recv_fds(right, request["nfds"])
        assert [os.fstat(fd).st_ino for fd in got] == [os.fstat(fd).st_ino for fd in sent]
        _zygote._send(left, "after the fds")  # the stream is still in step
        assert _zygote._recv(right, time.monotonic() + 10) == "after the fds"
    finally:
        for fd in got + [fd for pair in pipes for fd in pair]:
            os.close(fd)
        left.close()
        right.close()


def test_300_zygote_ranks_within_the_usual_fd_limit(no_leaks):
    # Before: ValueError "too many file descriptors to pass to the zygote (301 > 253)".
    # The launcher holds about 2 fds a rank (3 while the zygote starts them):
    # 300 ranks fit in the usual soft limit of 1024 open files.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    t0 = time.monotonic()
    try:
        out = fastspawn.spawn(times, args=(2,), nprocs=300, start_method="zygote")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert out == [2 * i for i in range(300)]
    assert time.monotonic() - t0 < 45


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("nprocs,exc,match", [
    (0, ValueError, "at least 1"), (-2, ValueError, "at least 1"),
    (2.0, TypeError, "must be an int"), ("2", TypeError, "must be an int"),
    (True, TypeError, "must be an int")])
def test_bad_nprocs(nprocs, exc, match, no_leaks):
    with pytest.raises(exc, match=match):
        fastspawn.spawn(times, args=(1,), nprocs=nprocs)


def test_bad_fn_args_method(no_leaks):
    with pytest.raises(TypeError, match="fn must be callable"):
        fastspawn.spawn(42, nprocs=1)
    with pytest.raises(TypeError, match="args must be a tuple"):
        fastspawn.spawn(times, args=3, nprocs=1)
    with pytest.raises(TypeError, match="kwargs must be a dict"):
        fastspawn.spawn(times, args=(1,), kwargs=[1], nprocs=1)
    with pytest.raises(ValueError, match="unknown start_method 'threads'"):
        fastspawn.spawn(times, args=(1,), nprocs=1, start_method="threads")


@pytest.mark.parametrize("method", ["zygote", "spawn", "forkserver"])
def test_unpicklable_args_fail_before_any_rank(method, no_leaks):
    before = children_of(os.getpid())
    with pytest.raises(fastspawn.ArgumentPicklingError, match="cannot be sent") as info:
        fastspawn.spawn(times, args=(threading.Lock(),), nprocs=2, start_method=method)
    assert isinstance(info.value, TypeError)
    assert "start_method='fork'" in str(info.value)
    assert children_of(os.getpid()) == before


def test_negative_join_timeout(no_leaks):
    ctx = fastspawn.spawn(times, args=(1,), nprocs=1, join=False, start_method="fork")
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        ctx.join(timeout=-1)
    with pytest.raises(ValueError, match="grace_period must be >= 0"):
        ctx.join(grace_period=-0.5)
    assert ctx.join(timeout=20)


# ----------------------------------------------------------------- nothing left behind

LAUNCHER = r"""
import os, subprocess, sys, time
import fastspawn

def rank(i, path):
    # A grandchild in the rank's process group, like a DataLoader worker.
    child = subprocess.Popen(["sleep", "120"])
    with open(f"{path}.{i}", "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}")
    time.sleep(120)

if __name__ == "__main__":
    path, method = sys.argv[1], sys.argv[2]
    print("launcher", os.getpid(), flush=True)
    fastspawn.spawn(rank, args=(path,), nprocs=2, start_method=method)
"""


def _start_launcher(tmp_path, method):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(fastspawn.__file__)),
                                        env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "pids"), method],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    pids = []
    while time.monotonic() < deadline:
        files = [tmp_path / f"pids.{i}" for i in range(2)]
        if all(f.exists() and f.read_text() for f in files):
            pids = [int(x) for f in files for x in f.read_text().split()]
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert len(pids) == 4, "ranks did not start"
    return proc, pids


@pytest.mark.parametrize("method", ["fork", "zygote"])
def test_parent_sigkill_leaves_no_rank_or_grandchild(tmp_path, method):
    proc, pids = _start_launcher(tmp_path, method)
    proc.kill()
    proc.wait(10)
    assert wait_gone(pids, 10) == []


@pytest.mark.parametrize("method", ["fork", "zygote"])
def test_ctrl_c_stops_everything(tmp_path, method):
    proc, pids = _start_launcher(tmp_path, method)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    assert proc.returncode != 0
    assert wait_gone(pids, 10) == []


def test_sigterm_forwarded_and_launcher_dies_by_it(tmp_path):
    proc, pids = _start_launcher(tmp_path, "fork")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert wait_gone(pids, 10) == []


def leave_a_worker(i, path, go, fail):
    # Rank 0 starts a worker in its process group (a DataLoader worker that outlives
    # it) and returns; rank 1 waits for the test, then succeeds or fails.
    if i == 0:
        worker = subprocess.Popen(["sleep", "120"])
        with open(path + ".tmp", "w") as fh:
            fh.write(str(worker.pid))
        os.rename(path + ".tmp", path)
        return
    assert go.wait(60)
    if fail:
        raise RuntimeError("rank 1 fails")


@pytest.mark.parametrize("method", ["fork", "zygote",
                                    pytest.param("spawn", marks=pytest.mark.slow)])
@pytest.mark.parametrize("end", ["success", "failure"])
def test_worker_of_a_finished_rank_dies_with_the_job(tmp_path, method, end):
    # The rank is kept unreaped until the job ends, so its process group is still the
    # job's then: what is left of it is killed, when the job succeeds (before: the
    # worker was left running) and when another rank fails (the stop).
    path = str(tmp_path / "worker")
    go = fastspawn.get_context(method).Event()
    ctx = fastspawn.start_processes(leave_a_worker, (path, go, end == "failure"), 2,
                                   join=False, start_method=method)
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    worker = int(open(path).read())
    assert wait_gone([ctx.pids()[0]], 30) == []  # rank 0 has ended (and is not reaped)
    assert pid_alive(worker)  # a rank's own end does not touch its group
    go.set()
    if end == "failure":
        with pytest.raises(fastspawn.ProcessRaisedException):
            ctx.join(60)
    else:
        assert ctx.join(60)
    assert wait_gone([worker], 10) == []


def test_no_zombies_after_join(no_leaks):
    fastspawn.spawn(times, args=(1,), nprocs=4, start_method="fork")
    for pid in children_of(os.getpid()):
        assert pid_alive(pid) or False, f"zombie child {pid}"


def test_zygote_prestarted_on_import_when_asked():
    code = """
import fastspawn
z = fastspawn._zygote._zygote
assert z is not None and z.alive(), "no zygote after import"
print(fastspawn.spawn(lambda i: i * 3, nprocs=2, start_method="zygote"))
"""
    out = run_python(code, extra_env={"FASTSPAWN_PRESTART_ZYGOTE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 3]"
