"""A script written for torch.multiprocessing.spawn runs unchanged under fastspawn:
every init_method keeps torch's meaning inside a rank, and torch's spawn
semantics (join order, log lines, exceptions, Process attributes) hold."""
import logging
import multiprocessing.connection
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.multiprocessing.spawn import ProcessException as TorchProcessException

import fastspawn
from conftest import PACKAGE_DIR, pid_alive, socket_inodes, tcp_listeners

TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_ports_of(pid: int) -> set:
    """The TCP ports process pid itself listens on."""
    listening = tcp_listeners()
    return {listening[i][1] for i in socket_inodes(pid) if i in listening}


def init_kwargs(form, i, n, port, tmp, rnd):
    """init_process_group arguments as a torch script would write them."""
    if form == "tcp":
        return dict(init_method=f"tcp://127.0.0.1:{port}", rank=i, world_size=n)
    if form == "file":
        return dict(init_method=f"file://{tmp}/rdzv{rnd}", rank=i, world_size=n)
    if form == "env":  # torch's default init_method, MASTER_* as the launcher set them
        return {}
    if form == "env_user":  # the DDP tutorial's setup(): the rank picks its own port
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "localhost", str(port)
        return dict(rank=i, world_size=n)
    if form == "store":
        store = dist.TCPStore("127.0.0.1", port, n, is_master=(i == 0), timeout=TIMEOUT)
        return dict(store=dist.PrefixStore(f"round{rnd}", store), rank=i, world_size=n)
    raise AssertionError(form)


def default_store_kind() -> str:
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):  # PrefixStore layers
        store = store.underlying_store
    return type(store).__name__


def two_rounds(i, n, form, port, tmp):
    """Two groups one after the other (destroy_process_group in between)."""
    out = []
    for rnd in range(2):
        dist.init_process_group("gloo", timeout=TIMEOUT, **init_kwargs(form, i, n, port, tmp, rnd))
        t = torch.tensor([float(i + 1 + rnd)])
        dist.all_reduce(t)
        listening = listening_ports_of(os.getpid())  # gloo's own pair listeners included
        kind = default_store_kind()
        dist.barrier()  # rank 0's server stays up until everyone has looked
        dist.destroy_process_group()
        served_by_launcher = int(os.environ["MASTER_PORT"]) in listening_ports_of(os.getppid())
        out.append((t.item(), dist.is_initialized(), sorted(listening), kind,
                    int(os.environ["MASTER_PORT"]), served_by_launcher))
    return out


@pytest.mark.parametrize("nprocs", [2, 4])
@pytest.mark.parametrize("form", ["tcp", "file", "env", "env_user", "store"])
def test_every_init_method_keeps_torch_meaning(form, nprocs, tmp_path, no_leaks):
    port = free_port()
    out = fastspawn.spawn(two_rounds, args=(nprocs, form, port, str(tmp_path)), nprocs=nprocs,
                          start_method="fork")
    total = nprocs * (nprocs + 1) / 2
    for i, rounds in enumerate(out):
        assert [r[0] for r in rounds] == [total, total + nprocs]
        assert not any(r[1] for r in rounds)
        for _, _, listening, kind, master_port, served_by_launcher in rounds:
            if form in ("tcp", "env_user", "store"):
                # torch's TCPStore at the user's port, hosted by rank 0 as under torch
                assert kind == "TCPStore"
                assert (port in listening) == (i == 0)
            elif form == "file":
                assert kind == "FileStore" and port not in listening
            else:  # env:// goes through the launcher's store: no rank binds a port
                assert kind == "Store"
                assert served_by_launcher and master_port not in listening


def env_rank(i, rounds):
    for _ in range(rounds):
        dist.init_process_group("gloo", timeout=TIMEOUT)
        t = torch.ones(1)
        dist.all_reduce(t)
        dist.destroy_process_group()
    return t.item(), os.environ["MASTER_PORT"]


@pytest.mark.parametrize("method", ["zygote", pytest.param("spawn", marks=pytest.mark.slow)])
def test_env_init_method_other_start_methods(method, no_leaks):
    assert fastspawn.spawn(env_rank, args=(2,), nprocs=2, start_method=method)[0][0] == 2.0


def test_parent_master_port_is_not_bound(no_leaks, monkeypatch):
    # A torch script sets MASTER_PORT before spawning; on one machine fastspawn
    # needs no agreed port, so two such jobs can never clash.
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    out = fastspawn.spawn(env_rank, args=(1,), nprocs=2, start_method="fork")
    assert [o[0] for o in out] == [2.0, 2.0]
    assert out[0][1] != str(port)


def test_torchelastic_agent_variable_does_not_reach_ranks(tmp_path, monkeypatch, no_leaks):
    # Under torchrun the launcher has TORCHELASTIC_USE_AGENT_STORE=True; a rank
    # that hosts its own tcp:// store must not inherit it.
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    out = fastspawn.spawn(two_rounds, args=(2, "tcp", free_port(), str(tmp_path)), nprocs=2,
                          start_method="fork")
    assert out[0][0][0] == 3.0


JOB = r"""
import sys, os
import torch, torch.distributed as dist
import fastspawn as mp

def work(i, rounds):
    for _ in range(rounds):
        dist.init_process_group("gloo")
        t = torch.ones(1) * (i + 1)
        dist.all_reduce(t)
        dist.destroy_process_group()
    return t.item()

if __name__ == "__main__":
    sys.stdin.readline()  # start together
    print(mp.spawn(work, args=(3,), nprocs=int(sys.argv[1])))
"""


def test_two_env_jobs_at_once(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = dict(os.environ, PYTHONPATH=PACKAGE_DIR, MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))  # the same port in both: no clash
    jobs = [subprocess.Popen([sys.executable, str(script), "3"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    for job in jobs:
        job.stdin.write("go\n")
        job.stdin.flush()
    for job in jobs:
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        assert out.strip() == "[6.0, 6.0, 6.0]"


def init_with(i, url):
    dist.init_process_group("gloo", init_method=url, rank=i, world_size=2, timeout=TIMEOUT)


def test_tcp_port_taken_by_another_program_fails_at_once(no_leaks):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        url = f"tcp://127.0.0.1:{other.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(fastspawn.ProcessRaisedException) as info:
            fastspawn.spawn(init_with, args=(url,), nprocs=2, start_method="fork")
    assert time.monotonic() - t0 < 20  # not the 60 s timeout
    assert info.value.error_index == 0  # rank 0 hosts; it cannot
    # torch's own words: "... EADDRINUSE ..." (2.13), "Address already in use" (2.1)
    assert re.search("EADDRINUSE|Address already in use", str(info.value)), str(info.value)


def test_file_path_that_cannot_be_created_fails_at_once(tmp_path, no_leaks):
    url = f"file://{tmp_path}/missing-dir/rdzv"
    t0 = time.monotonic()
    with pytest.raises(fastspawn.ProcessRaisedException) as info:
        fastspawn.spawn(init_with, args=(url,), nprocs=2, start_method="fork")
    assert time.monotonic() - t0 < 20
    assert "missing-dir does not exist" in str(info.value)
    assert "DistStoreError" in str(info.value) or not hasattr(dist, "DistStoreError")


def test_env_handler_is_wrapped_on_this_torch():
    # The one torch internal fastspawn touches: fail loudly when a torch moves it.
    out = fastspawn.spawn(_handler_names, nprocs=1, start_method="fork")
    assert out == [(True, True)]


def _handler_names(i):
    import importlib
    handlers = importlib.import_module("torch.distributed.rendezvous")._rendezvous_handlers
    return (hasattr(handlers["env"], "fastspawn_wraps"),
            hasattr(handlers["file"], "fastspawn_wraps"))


# ----------------------------------------------------------------- join, torch's order


def rank0_fails_after_ready(i, behaviour, ready_r, ready_w):
    if i == 0:
        os.close(ready_w)
        # Wait until every other rank has set itself up, then fail.
        got = 0
        while got < int(os.environ["WORLD_SIZE"]) - 1:
            got += len(os.read(ready_r, 16))
        raise ValueError("rank 0 fails")
    os.close(ready_r)
    if behaviour == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(ready_w, b"x")
    os.close(ready_w)
    if behaviour == "exit_soon":
        time.sleep(0.5)
        return
    time.sleep(120)


def run_failing(behaviour, nprocs, grace_period):
    ready_r, ready_w = os.pipe()
    try:
        ctx = fastspawn.start_processes(rank0_fails_after_ready,
                                        (behaviour, ready_r, ready_w), nprocs, join=False,
                                        start_method="fork")
    finally:
        os.close(ready_r)
        os.close(ready_w)
    t0 = time.monotonic()
    with pytest.raises(fastspawn.ProcessRaisedException):
        while not ctx.join(grace_period=grace_period):
            pass
    return ctx, time.monotonic() - t0


def spawn_records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "torch.multiprocessing.spawn"]


def test_without_grace_period_sigterm_at_once(caplog, no_leaks):
    caplog.set_level(logging.INFO, logger="torch.multiprocessing.spawn")
    ctx, took = run_failing("sleep", 3, None)
    pids = ctx.pids()
    assert spawn_records(caplog) == [f"Terminating process {pids[1]} via signal SIGTERM",
                                     f"Terminating process {pids[2]} via signal SIGTERM"]
    assert [p.exitcode for p in ctx.processes] == [1, -signal.SIGTERM, -signal.SIGTERM]
    assert took < 20


def test_grace_period_waits_then_sigterm_then_sigkill(caplog, no_leaks):
    caplog.set_level(logging.INFO, logger="torch.multiprocessing.spawn")
    ctx, took = run_failing("ignore_term", 2, 0.5)
    pid = ctx.pids()[1]
    assert spawn_records(caplog) == [
        f"Terminating process {pid} via signal SIGTERM",
        f"Unable to shutdown process {pid} via SIGTERM , forcefully exiting via SIGKILL"]
    assert ctx.processes[1].exitcode == -signal.SIGKILL
    assert 1.0 <= took < 20  # two grace periods, not 30 s


def test_grace_period_lets_ranks_finish_on_their_own(caplog, no_leaks):
    caplog.set_level(logging.INFO, logger="torch.multiprocessing.spawn")
    ctx, _ = run_failing("exit_soon", 3, 10)
    assert spawn_records(caplog) == []  # nobody needed a signal
    assert [p.exitcode for p in ctx.processes] == [1, 0, 0]


# ----------------------------------------------------------------- processes


def wait_for_event(i, event):
    assert event.wait(60)
    return i


@pytest.mark.parametrize("method", ["fork", "zygote"])
def test_processes_act_like_multiprocessing_process(method, no_leaks):
    go = fastspawn.get_context(method).Event()
    ctx = fastspawn.start_processes(wait_for_event, (go,), 2, join=False, start_method=method)
    p0, _ = ctx.processes
    assert p0.pid > 0 and p0.name == "fastspawn-rank-0" and p0.daemon is False
    assert p0.is_alive() and p0.exitcode is None
    sentinels = [p.sentinel for p in ctx.processes]
    assert multiprocessing.connection.wait(sentinels, timeout=0) == []
    with pytest.raises(ValueError, match="still running"):
        p0.close()
    go.set()
    pending = set(sentinels)
    while pending:
        ready = multiprocessing.connection.wait(pending, timeout=30)
        assert ready, "a sentinel did not fire after its rank ended"
        pending -= set(ready)
    p0.join(timeout=30)
    assert p0.exitcode == 0 and not p0.is_alive()
    assert ctx.join(timeout=30)
    assert ctx.processes[1].exitcode == 0
    late = ctx.processes[1].sentinel  # asked for after the end: ready at once
    assert multiprocessing.connection.wait([late], timeout=0) == [late]
    for p in ctx.processes:
        p.close()


def sleep_long(i):
    time.sleep(120)


@pytest.mark.parametrize("method", ["fork", "zygote"])
@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_process_terminate_and_kill(method, how, no_leaks):
    ctx = fastspawn.start_processes(sleep_long, nprocs=2, join=False, start_method=method)
    getattr(ctx.processes[1], how)()
    ctx.processes[1].join(timeout=30)
    sig = signal.SIGTERM if how == "terminate" else signal.SIGKILL
    assert ctx.processes[1].exitcode == -sig
    with pytest.raises(fastspawn.ProcessExitedException) as info:
        ctx.join(timeout=60)
    assert info.value.error_index == 1 and info.value.signal_name == sig.name
    assert not pid_alive(ctx.pids()[0])


def test_torch_signal_raises_pattern(no_leaks):
    # torch's own test: SIGTERM the ranks from outside, join raises.
    ctx = fastspawn.spawn(sleep_long, nprocs=1, join=False, start_method="fork")
    for pid in ctx.pids():
        os.kill(pid, signal.SIGTERM)
    with pytest.raises(fastspawn.ProcessExitedException):
        ctx.join()


# ----------------------------------------------------------------- exceptions


def test_exceptions_have_pid_and_error_pid_and_pickle_whole():
    raised = fastspawn.ProcessRaisedException("msg", 1, 4242)
    exited = fastspawn.ProcessExitedException("gone", 2, 4343, -9, "SIGKILL")
    for err in (raised, exited):
        err.add_note("a note")
        err.failures = [fastspawn.RankFailure(err.error_index, err.error_pid, None, "SIGKILL",
                                              "tb", threading.Lock(), 1)]
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert back.pid == back.error_pid == err.error_pid
        assert back.error_index == err.error_index and back.msg == err.msg
        assert back.__notes__ == ["a note"]
        assert back.failures[0].traceback == "tb" and back.failures[0].exception is None
        assert isinstance(back, TorchProcessException)
    back = pickle.loads(pickle.dumps(exited))
    assert back.exit_code == -9 and back.signal_name == "SIGKILL"


def raise_value(i):
    raise ValueError(f"legitimate exception from process {i}")


def test_raised_exception_from_a_real_run_pickles(no_leaks):
    with pytest.raises(fastspawn.ProcessRaisedException) as info:
        fastspawn.spawn(raise_value, nprocs=1, start_method="fork")
    back = pickle.loads(pickle.dumps(info.value))
    assert str(back) == str(info.value) and back.pid == info.value.pid > 0
    assert isinstance(back.failures[0].exception, ValueError)


# ----------------------------------------------------------------- names


def test_torch_names_are_there():
    for name in ("spawn", "start_processes", "ProcessContext", "SpawnContext",
                 "ProcessException", "ProcessRaisedException", "ProcessExitedException",
                 "ENV_VAR_PARALLEL_START", "get_context", "set_sharing_strategy",
                 "get_sharing_strategy", "get_all_sharing_strategies", "Queue",
                 "SimpleQueue", "Process", "Pipe", "Event"):
        assert hasattr(fastspawn, name), name
    # torch 2.1 has no such name yet; the variable is the same where it does.
    assert fastspawn.ENV_VAR_PARALLEL_START == getattr(torch_mp, "ENV_VAR_PARALLEL_START",
                                                       "TORCH_MP_PARALLEL_START")
    with pytest.warns(UserWarning, match="renamed to ProcessContext"):
        fastspawn.SpawnContext(None, 0, "fork", False)


def rank_index(i):
    return i


@pytest.mark.slow
def test_parallel_start_for_forkserver(caplog, monkeypatch, no_leaks):
    monkeypatch.setenv(fastspawn.ENV_VAR_PARALLEL_START, "1")
    caplog.set_level(logging.INFO, logger="torch.multiprocessing.spawn")
    assert fastspawn.start_processes(rank_index, nprocs=3, start_method="forkserver") == [0, 1, 2]
    assert "Starting processes in parallel." in spawn_records(caplog)
