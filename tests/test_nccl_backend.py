"""The fastspawn group on CUDA tensors (python/fastspawn/_cuda.py), without a GPU.

Each test runs a scenario of tests/nccl_scenarios.py in 2-4 ranks that fastspawn.spawn
starts from a fresh launcher, against the fake CUDA runtime + NCCL of tests/c/fake_cuda/
(host memory as device memory, a thread per stream, real arithmetic across the ranks).
The test-only switch FASTSPAWN_TEST_NCCL_ON_CPU=1 sends the ranks' CPU tensors through
the NCCL path, so every line of the CUDA half runs as it would on a GPU: loading,
the communicator and its unique id through the store, dtype / op mapping, stream
order, works, futures, coalescing, the watchdog. What only a GPU can show (real
streams, DDP with device_ids) is in tests/test_cuda.py.

Also here, in this process: every collective of ProcessGroupFastspawn hands CUDA
tensors to the CUDA half (and only those), and fastspawn.init_process_group's
device and backend choice.
"""
import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import PACKAGE_DIR, ROOT
from test_nccl_loader import FAKE_DIR, fake_libs

SCENARIOS = os.path.join(ROOT, "tests", "nccl_scenarios.py")


def run(scenario, world, nccl_on_cpu=True, timeout=90, **env):
    """The scenario's per-rank results (the launcher's RESULT line)."""
    fake_libs()
    e = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "FASTSPAWN_"))}
    e.update(PYTHONPATH=os.pathsep.join([PACKAGE_DIR, os.path.join(ROOT, "tests")]),
             FASTSPAWN_NCCL_LIBRARY=os.path.join(FAKE_DIR, "libnccl.so.2"),
             FASTSPAWN_CUDART_LIBRARY=os.path.join(FAKE_DIR, "libcudart.so.13"),
             FAKE_CUDA_DEVICES=str(world), PYTHONWARNINGS="ignore")
    if nccl_on_cpu:
        e["FASTSPAWN_TEST_NCCL_ON_CPU"] = "1"
    e.update(env)
    e["SCENARIO_STACKS_AFTER"] = str(timeout - 15)  # a hung rank prints its stacks first
    try:
        out = subprocess.run([sys.executable, SCENARIOS, scenario, str(world)],
                             capture_output=True, text=True, timeout=timeout, env=e)
    except subprocess.TimeoutExpired as t:  # the ranks die with the launcher (the guardian)
        raise AssertionError(f"{scenario} ({world} ranks) did not finish in {timeout} s\n"
                             f"{t.stdout}\n{t.stderr}") from None
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------
# Collectives, end to end through the fake NCCL
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_reductions_every_dtype_and_op(world):
    results = run("reductions", world)
    # every rank ran the same set, including bfloat16 and both float8 types
    assert all(r == results[0] for r in results)
    for want in ("SUM:torch.bfloat16", "AVG:torch.float16", "PRODUCT:torch.int64",
                 "MIN:torch.float8_e4m3fn", "MAX:torch.float8_e5m2", "SUM:torch.uint8"):
        assert want in results[0]


@pytest.mark.parametrize("world", [2, 4])
def test_data_movement_gather_scatter_all_to_all_send_recv(world):
    assert run("data", world) == ["ok"] * world


def test_coalescing_is_one_nccl_group_and_one_work():
    assert run("coalescing", 2) == ["ok", "ok"]


@pytest.mark.parametrize("world", [2, 3])
def test_batch_isend_irecv_both_ways_is_one_group_and_never_waits(world):
    assert run("p2p_batch", world) == ["ok"] * world


@pytest.mark.parametrize("world", [2, 3])
def test_isend_irecv_ring_completed_by_wait_future_synchronize_or_blocking_recv(world):
    assert run("p2p_ring", world) == ["ok"] * world


@pytest.mark.parametrize("world", [2, 3])
def test_a_queued_isend_is_issued_before_the_next_collective(world):
    assert run("p2p_then_collective", world) == ["ok"] * world


def test_queued_sends_and_coalescing_blocks():
    assert run("p2p_coalescing", 2) == ["ok", "ok"]


def test_is_completed_issues_queued_sends():
    assert run("p2p_is_completed", 2) == ["ok", "ok"]


def test_queued_sends_wait_for_the_streams_current_when_they_were_called():
    assert run("p2p_streams", 2) == ["ok", "ok"]


def test_shutdown_issues_queued_sends_and_abort_fails_them():
    results = run("p2p_shutdown", 2)
    assert results[0][0] is None and results[1][0] == 9.0, results
    for rank, (_, aborted) in enumerate(results):
        assert aborted == (f"fastspawn: rank {rank} aborted the process group before this "
                           "send was issued"), aborted


def test_stream_order_of_a_collective_its_wait_and_a_synchronous_call():
    assert run("streams", 2) == ["ok", "ok"]


def test_bad_input_is_a_clear_error_and_the_group_stays_usable():
    results = run("errors", 2)
    assert results[0] == results[1] == sorted(
        ["int16", "bitwise", "not a dense", "broadcast root", "needs", "world_size",
         "any source", "PREMUL_SUM"])


def test_subgroup_communicator_has_the_subgroups_rank_and_size():
    # ranks 0 and 2 of 3 form a subgroup: its communicator is theirs alone
    assert run("subgroups", 3) == [[0, 2, 0], None, [1, 2, 1]]


def test_ddp_averages_gradients_through_the_nccl_path():
    digests = run("ddp", 2)
    assert digests[0] == digests[1]  # replicas identical (each rank also checked the values)


# ---------------------------------------------------------------------------
# When CUDA and NCCL are touched
# ---------------------------------------------------------------------------

def test_the_communicator_is_created_at_the_first_cuda_collective():
    results = run("lazy", 2)
    nothing = {"nccl": False, "cudart": False, "nccl_version": 0}
    for rank, (before, after, devices) in enumerate(results):
        assert before == nothing
        assert after == {"nccl": True, "cudart": True, "nccl_version": 23007}
        assert devices == [rank]  # LOCAL_RANK's device


@pytest.mark.skipif(not hasattr(torch, "accelerator"), reason="torch without device_id")
def test_device_id_creates_the_communicator_in_init_process_group():
    # torch 2.13 hands device_id to no backend creator: it asks the group for
    # _get_backend(device).supports_splitting, then eager_connect_single_device
    assert run("eager", 2) == [[[0], 1], [[1], 1]]


def test_a_cpu_only_group_loads_nothing_cuda():
    results = run("cpu_only", 2, nccl_on_cpu=False)
    for values, no_comms, state, cudart, p2p in results:
        assert values == [2.0] * 3 and no_comms
        assert state == {"nccl": False, "cudart": False, "nccl_version": 0} and cudart is None
        assert len(p2p) == 4 and all("send/recv of CPU tensors is not supported" in m
                                     for m in p2p), p2p


# ---------------------------------------------------------------------------
# Failures: errors that name what failed, never a hang
# ---------------------------------------------------------------------------

def test_watchdog_fails_a_stuck_collective_naming_it_its_seq_and_the_timeout():
    results = run("watchdog", 2, FAKE_NCCL_STUCK="AllReduce")
    for rank, (first, sticky, took) in enumerate(results):
        assert first == (f"fastspawn: rank {rank}: NCCL watchdog: all_reduce (seq 1, 4 x "
                         "float32) did not complete within the timeout of 3000 ms; the NCCL "
                         "communicator was aborted")
        assert sticky and 2.9 < took < 20


def test_an_asynchronous_nccl_error_is_a_dist_backend_error():
    first, second = run("async_error", 2, FAKE_NCCL_ASYNC_ERROR="6@0")
    assert first.startswith("fastspawn: rank 0: ") and "ncclRemoteError" in first, first
    # named: the call it failed, or (seen by the watchdog after that call) none pending
    assert "all_reduce (seq 1" in first or "while no work was pending" in first, first
    # its peer finished before rank 0 gave up, or saw it go: no hang either way
    assert second == "no error" or second.startswith("fastspawn: rank 1: "), second


def test_a_dead_peer_is_an_error_naming_it_not_a_hang():
    (msg, took), gone = run("dead_peer", 2)
    assert gone is None  # rank 1 left without a result
    assert "ncclRemoteError" in msg and "rank 1 exited" in msg and "seq 2" in msg, msg
    assert took < 10


# ---------------------------------------------------------------------------
# In this process: the dispatch, the registration, init_process_group's choices
# ---------------------------------------------------------------------------

class _FakeCuda:
    """Stands in for a CUDA tensor: the dispatch must look at nothing but is_cuda."""
    is_cuda = True


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args):
            self.calls.append((name, args))
            return name
        return record


def _dispatch_cases(c):
    opts = torch._C._distributed_c10d
    t = c
    return {
        "allreduce": ([t], opts.AllreduceOptions()),
        "allreduce_coalesced": ([t, t], opts.AllreduceCoalescedOptions()),
        "reduce": ([t], opts.ReduceOptions()),
        "reduce_scatter": ([t], [[t]], opts.ReduceScatterOptions()),
        "reduce_scatter_single": (t, t, opts.ReduceScatterOptions()),
        "_reduce_scatter_base": (t, t, opts.ReduceScatterOptions()),
        "reduce_scatter_tensor_coalesced": ([t], [t], opts.ReduceScatterOptions()),
        "reduce_scatter_single_coalesced": ([t], [t], opts.ReduceScatterOptions()),
        "broadcast": ([t], opts.BroadcastOptions()),
        "allgather": ([[t]], [t], opts.AllgatherOptions()),
        "all_gather_single": (t, t, opts.AllgatherOptions()),
        "_allgather_base": (t, t, opts.AllgatherOptions()),
        "allgather_into_tensor_coalesced": ([t], [t], opts.AllgatherOptions()),
        "all_gather_single_coalesced": ([t], [t], opts.AllgatherOptions()),
        "gather": ([[t]], [t], opts.GatherOptions()),
        "scatter": ([t], [[t]], opts.ScatterOptions()),
        "alltoall": ([t], [t], opts.AllToAllOptions()),
        "all_to_all_single": (t, t, [], [], opts.AllToAllOptions()),
        "alltoall_base": (t, t, [], [], opts.AllToAllOptions()),
        "send": ([t], 0, 0),
        "recv": ([t], 0, 0),
        "recv_anysource": ([t], 0),
        "_start_coalescing": (torch.device("cuda", 0),),
        "_end_coalescing": (torch.device("cuda", 0),),
    }


def _one_rank_group():
    from fastspawn.backend import ProcessGroupFastspawn
    return ProcessGroupFastspawn(dist.HashStore(), 0, 1, timedelta(seconds=30))


def test_every_collective_hands_cuda_tensors_to_the_cuda_half(monkeypatch):
    from fastspawn import _cuda

    pg = _one_rank_group()
    real, rec = pg._cuda, _Recorder()
    pg._cuda = rec
    try:
        cases = _dispatch_cases(_FakeCuda())
        # every method the CUDA half has is dispatched (barrier below)
        assert set(cases) | {"barrier"} == set(_cuda.COLLECTIVES)
        aliases = {"_reduce_scatter_base": "reduce_scatter_single",
                   "reduce_scatter_single_coalesced": "reduce_scatter_tensor_coalesced",
                   "_allgather_base": "all_gather_single",
                   "all_gather_single_coalesced": "allgather_into_tensor_coalesced",
                   "alltoall_base": "all_to_all_single"}
        for name, args in cases.items():
            rec.calls.clear()
            assert getattr(pg, name)(*args) in (aliases.get(name, name), None), name
            assert rec.calls == [(aliases.get(name, name), args)], (name, rec.calls)
        # barrier: CUDA when device_ids name GPUs (and there are some), else the CPU one
        opts = torch._C._distributed_c10d.BarrierOptions()
        opts.device_ids = [0]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        rec.calls.clear()
        assert pg.barrier(opts) == "barrier" and rec.calls == [("barrier", (opts,))]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        rec.calls.clear()
        pg.barrier(opts).wait()
        pg.barrier().wait()
        assert rec.calls == []
        # CPU tensors never reach it
        t = torch.ones(3)
        pg.allreduce([t]).wait()
        outs = [torch.zeros(3)]
        pg.allgather([outs], [t]).wait()
        assert rec.calls == [] and t.tolist() == [1.0] * 3 and outs[0].tolist() == [1.0] * 3
        for p2p in (pg.send, pg.recv):
            with pytest.raises(NotImplementedError, match="send/recv of CPU tensors"):
                p2p([t], 0, 0)
        assert rec.calls == []
    finally:
        pg._cuda = real
        pg.shutdown()


def test_get_backend_answers_for_cuda_devices_only():
    pg = _one_rank_group()
    try:
        view = pg._get_backend(torch.device("cuda", 0))
        assert view.supports_splitting and view.name() == "fastspawn"
        with pytest.raises(RuntimeError):
            pg._get_backend(torch.device("cpu"))
        assert pg._cuda.communicators == {}  # asking connects nothing
    finally:
        pg.shutdown()


def test_registered_for_both_devices():
    import fastspawn.backend  # noqa: F401

    assert dist.Backend.backend_capability["fastspawn"] == ["cpu", "cuda"]
    config = str(dist.distributed_c10d.BackendConfig(dist.Backend("fastspawn")))
    assert config == "cpu:fastspawn,cuda:fastspawn"


def test_default_backend_is_fastspawn_with_or_without_cuda(monkeypatch):
    import fastspawn

    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        assert fastspawn.default_backend() == "fastspawn"


@pytest.mark.parametrize("backend,lazy", [("fastspawn", True), ("nccl", False),
                                          ("cpu:gloo,cuda:nccl", False), ("gloo", None)])
def test_rank_device_from_local_rank(monkeypatch, backend, lazy):
    """fastspawn's group sets LOCAL_RANK's device for the first CUDA use (no CUDA
    context for a group that never touches a GPU); NCCL at once; gloo never."""
    from fastspawn import _rendezvous

    done, queued = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", done.append)
    monkeypatch.setattr(torch.cuda, "_lazy_call", lambda fn, **kw: queued.append(fn))
    monkeypatch.setenv("LOCAL_RANK", "3")
    _rendezvous.set_rank_device(backend)
    if lazy is None:
        assert done == [] and queued == []
    elif lazy:
        assert done == [] and len(queued) == 1
        queued[0]()  # what torch runs when CUDA initialises
        assert done == [1]  # 3 % 2
    else:
        assert done == [1] and queued == []
