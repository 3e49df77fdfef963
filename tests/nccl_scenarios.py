"""Scenarios for tests/test_nccl_backend.py: each runs in every rank of a job that
fastspawn.spawn starts, with fastspawn's group.

    python tests/nccl_scenarios.py SCENARIO WORLD

The launcher prints one line ``RESULT <json>``: the ranks' return values, in rank
order. A rank checks what it can itself (asserts) and returns what the test compares
across ranks. The test runs this in a fresh interpreter whose environment selects the
fake CUDA runtime + NCCL (tests/c/bin/fake/) and, for most scenarios, the test-only
switch FASTSPAWN_TEST_NCCL_ON_CPU=1 that sends CPU tensors through the NCCL path.
"""
import ctypes
import faulthandler
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import fastspawn
from fastspawn import _C

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def fake_log():
    """The fake runtime's call log (the loaded copy: dlopen of the same path)."""
    lib = ctypes.CDLL(os.environ["FASTSPAWN_CUDART_LIBRARY"])
    n = lib.fakecuda_log_read(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.fakecuda_log_read(buf, n + 1)
    return buf.value.decode().splitlines()


def fake_log_clear():
    ctypes.CDLL(os.environ["FASTSPAWN_CUDART_LIBRARY"]).fakecuda_log_clear()


def calls(lines, *names):
    """(call, {field: value}) for the log lines of the given calls, in order."""
    out = []
    for line in lines:
        word = line.split()[0]
        if word in names:
            out.append((word, dict(tok.split("=", 1) for tok in line.split()[1:] if "=" in tok)))
    return out


def _cuda_libs():
    return {line.split()[-1] for line in open("/proc/self/maps")
            if "libnccl" in line or "libcudart" in line}


# What import torch loaded itself (a CUDA build of torch loads both libraries).
BASELINE = _cuda_libs()


def loaded():
    """What fastspawn loaded: libraries mapped since import, and its loader's view."""
    new = _cuda_libs() - BASELINE
    return {"nccl": any("libnccl" in p for p in new), "cudart": any("libcudart" in p for p in new),
            "nccl_version": _C.nccl_version()}


def group():
    return dist.distributed_c10d._get_default_group()


def inputs(rank, n, dtype, offset=0):
    """Rank r's input: small integers (exact in every dtype, fp8 included)."""
    base = torch.arange(n) % 3 + 1 + rank + offset
    return base.to(dtype)


def expected(world, n, dtype, reduce, offset=0, scale=1.0):
    xs = torch.stack([inputs(r, n, torch.float64, offset) * scale for r in range(world)])
    return reduce(xs).to(dtype)


REDUCE = {
    "SUM": lambda xs: xs.sum(0),
    "AVG": lambda xs: xs.mean(0),
    "MIN": lambda xs: xs.min(0).values,
    "MAX": lambda xs: xs.max(0).values,
    "PRODUCT": lambda xs: xs.prod(0),
}


def same(got, want, what):
    g, w = got.to(torch.float64), want.to(torch.float64)
    assert g.shape == w.shape and torch.equal(g, w), f"{what}: got {g.tolist()}, want {w.tolist()}"


# ---------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------

@scenario
def reductions(rank, world):
    fastspawn.init_process_group()
    n, done = 7, []
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
              torch.uint8, torch.int32, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2]
    for dtype in dtypes:
        ops = ["SUM", "MIN", "MAX"] + (["PRODUCT"] if dtype.itemsize > 1 else [])
        ops += ["AVG"] if dtype.is_floating_point and dtype.itemsize > 1 else []
        for name in ops:
            t = inputs(rank, n, dtype)
            dist.all_reduce(t, op=getattr(dist.ReduceOp, name))
            same(t, expected(world, n, dtype, REDUCE[name]), f"all_reduce {name} {dtype}")
            done.append(f"{name}:{dtype}")
    # uint32/uint64 (torch >= 2.3), bool (SUM = any, PRODUCT = all), complex (as pairs of reals)
    for dtype in [getattr(torch, n) for n in ("uint32", "uint64") if hasattr(torch, n)]:
        t = inputs(rank, n, torch.int64).to(dtype)
        dist.all_reduce(t)
        same(t.to(torch.int64), expected(world, n, torch.int64, REDUCE["SUM"]), f"sum {dtype}")
    flags = torch.tensor([rank == 0, True, False])
    anyf = flags.clone()
    dist.all_reduce(anyf)
    allf = flags.clone()
    dist.all_reduce(allf, op=dist.ReduceOp.PRODUCT)
    assert anyf.tolist() == [True, True, False] and allf.tolist() == [world == 1, True, False]
    c = torch.complex(inputs(rank, n, torch.float32), -inputs(rank, n, torch.float32))
    dist.all_reduce(c)
    same(c.real, expected(world, n, torch.float32, REDUCE["SUM"]), "complex sum (real)")
    same(c.imag, -expected(world, n, torch.float32, REDUCE["SUM"]), "complex sum (imag)")
    # PREMUL_SUM: a host factor (read at the call) and a device one (read when it runs)
    fake_log_clear()
    premul = hasattr(dist._make_nccl_premul_sum(1.0), "factor")  # torch >= 2.2
    for factor in (0.5, torch.tensor([0.25])) if premul else ():
        t = inputs(rank, n, torch.float32)
        dist.all_reduce(t, op=dist._make_nccl_premul_sum(factor))
        f = float(factor) if not isinstance(factor, torch.Tensor) else factor.item()
        same(t, expected(world, n, torch.float32, REDUCE["SUM"], scale=f), f"premul {factor}")
    residence = [c[1]["residence"] for c in calls(fake_log(), "ncclRedOpCreatePreMulSum")]
    # ncclScalarHostImmediate (1), ncclScalarDevice (0)
    assert residence == (["1", "0"] if premul else []), residence
    # async + wait, and a CUDA-style future
    t = inputs(rank, n, torch.float32)
    work = dist.all_reduce(t, async_op=True)
    assert work.wait() is True
    same(t, expected(world, n, torch.float32, REDUCE["SUM"]), "async all_reduce")
    t = inputs(rank, n, torch.float32)
    fut = dist.all_reduce(t, async_op=True).get_future()
    same(fut.wait()[0], expected(world, n, torch.float32, REDUCE["SUM"]), "future value")
    # reduce to each root (in place on the root; others keep their input)
    for root in range(world):
        t = inputs(rank, n, torch.float32)
        dist.reduce(t, root, op=dist.ReduceOp.MAX)
        want = (expected(world, n, torch.float32, REDUCE["MAX"]) if rank == root
                else inputs(rank, n, torch.float32))
        same(t, want, f"reduce to {root}")
    # reduce_scatter: list and tensor inputs (block q of every rank goes to rank q)
    full = [inputs(rank, n, torch.float32, offset=10 * q) for q in range(world)]
    out = torch.zeros(n)
    dist.reduce_scatter(out, full)
    same(out, expected(world, n, torch.float32, REDUCE["SUM"], offset=10 * rank),
         "reduce_scatter list")
    out = torch.zeros(n)
    dist.reduce_scatter_tensor(out, torch.cat(full), op=dist.ReduceOp.AVG)
    same(out, expected(world, n, torch.float32, REDUCE["AVG"], offset=10 * rank),
         "reduce_scatter_tensor")
    dist.destroy_process_group()
    return sorted(done)


@scenario
def data(rank, world):
    fastspawn.init_process_group()
    # broadcast from each root, of a dtype NCCL cannot reduce (bytes move anything)
    for root in range(world):
        t = torch.arange(5, dtype=torch.int16) * (rank + 1)
        dist.broadcast(t, root)
        assert t.tolist() == [i * (root + 1) for i in range(5)], (root, t)
    # all_gather into a list, into one tensor; complex data
    mine = torch.complex(torch.full((3,), float(rank)), torch.ones(3))
    outs = [torch.zeros(3, dtype=torch.complex64) for _ in range(world)]
    dist.all_gather(outs, mine)
    assert [o.real.tolist() for o in outs] == [[float(q)] * 3 for q in range(world)]
    flat = torch.zeros(2 * world, dtype=torch.int64)
    dist.all_gather_into_tensor(flat, torch.tensor([rank, -rank]))
    assert flat.tolist() == [v for q in range(world) for v in (q, -q)], flat
    # gather and scatter to / from each root
    for root in range(world):
        got = [torch.zeros(2) for _ in range(world)] if rank == root else None
        dist.gather(torch.full((2,), rank + 0.5), got, dst=root)
        if rank == root:
            assert [g.tolist() for g in got] == [[q + 0.5] * 2 for q in range(world)], got
        out = torch.zeros(3, dtype=torch.int32)
        pieces = [torch.full((3,), 10 * q + root, dtype=torch.int32) for q in range(world)]
        dist.scatter(out, pieces if rank == root else None, src=root)
        assert out.tolist() == [10 * rank + root] * 3, (root, out)
    # all_to_all of lists with uneven sizes: rank r sends r + q + 1 values to rank q
    ins = [torch.full((rank + q + 1,), 100 * rank + q, dtype=torch.int64) for q in range(world)]
    outs = [torch.zeros(q + rank + 1, dtype=torch.int64) for q in range(world)]
    dist.all_to_all(outs, ins)
    assert [o.tolist() for o in outs] == [[100 * q + rank] * (q + rank + 1)
                                         for q in range(world)], outs
    # all_to_all_single: even, and uneven splits (rows of 2 columns)
    x = torch.arange(2 * world, dtype=torch.float32) + 100 * rank
    y = torch.zeros_like(x)
    dist.all_to_all_single(y, x)
    assert y.tolist() == [100 * q + 2 * rank + i for q in range(world) for i in range(2)], y
    send_rows = [rank + q + 1 for q in range(world)]
    recv_rows = [q + rank + 1 for q in range(world)]
    x = torch.cat([torch.full((k, 2), 10 * rank + q, dtype=torch.int64)
                   for q, k in enumerate(send_rows)])
    y = torch.zeros(sum(recv_rows), 2, dtype=torch.int64)
    dist.all_to_all_single(y, x, output_split_sizes=recv_rows, input_split_sizes=send_rows)
    want = torch.cat([torch.full((k, 2), 10 * q + rank, dtype=torch.int64)
                      for q, k in enumerate(recv_rows)])
    assert torch.equal(y, want), (y, want)
    # send / recv around the ring, blocking and not
    right, left = (rank + 1) % world, (rank - 1) % world
    if world > 1:
        got = torch.zeros(4)
        if rank % 2 == 0:
            dist.send(torch.full((4,), float(rank)), right)
            dist.recv(got, left)
        else:
            dist.recv(got, left)
            dist.send(torch.full((4,), float(rank)), right)
        assert got.tolist() == [float(left)] * 4, got
        got = torch.zeros(2)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((2,), 7.0 + rank), right),
                                       dist.P2POp(dist.irecv, got, left)])
        for req in reqs:
            req.wait()
        assert got.tolist() == [7.0 + left] * 2, got
    dist.barrier()
    dist.barrier(async_op=True).wait()
    # object collectives ride on the same group
    objs = [None] * world
    dist.all_gather_object(objs, {"rank": rank})
    assert objs == [{"rank": q} for q in range(world)], objs
    dist.destroy_process_group()
    return "ok"


@scenario
def coalescing(rank, world):
    fastspawn.init_process_group()
    pg = group()
    # the fast path: all_reduce calls collected by torch, then one allreduce_coalesced
    ts = [inputs(rank, k + 1, torch.float32) for k in range(3)]
    dist.all_reduce(torch.ones(1))  # the communicator exists: the log below is the group's
    comm = pg._cuda.communicators[_dev()]
    seq = comm.seq
    fake_log_clear()
    with dist._coalescing_manager():
        for t in ts:
            dist.all_reduce(t)
    for k, t in enumerate(ts):
        same(t, expected(world, k + 1, torch.float32, REDUCE["SUM"]), f"coalesced {k}")
    log = fake_log()
    assert len(calls(log, "ncclAllReduce")) == 3, log
    assert comm.seq == seq + 1, (comm.seq, seq)  # one NCCL group, one work
    ends = [c for c in calls(log, "cudaEventRecord") if c[1]["stream"] != "0x0"]
    assert len(ends) == 1, log
    # all_gather_into_tensor and reduce_scatter_tensor, coalesced
    outs = [torch.zeros(2 * world) for _ in range(2)]
    with dist._coalescing_manager():
        for k, o in enumerate(outs):
            dist.all_gather_into_tensor(o, torch.full((2,), float(10 * k + rank)))
    assert [o.tolist() for o in outs] == [[10.0 * k + q for q in range(world) for _ in range(2)]
                                          for k in range(2)], outs
    outs = [torch.zeros(2) for _ in range(2)]
    with dist._coalescing_manager():
        for o in outs:
            dist.reduce_scatter_tensor(o, torch.ones(2 * world))
    assert [o.tolist() for o in outs] == [[float(world)] * 2] * 2, outs
    # the device form: _start_coalescing / _end_coalescing around any collectives
    seq = comm.seq
    a = torch.full((3,), float(rank))
    b = inputs(rank, 4, torch.float32)
    with dist._coalescing_manager(pg, torch.device("cpu"), async_ops=True) as cm:
        dist.broadcast(a, 0)
        dist.all_reduce(b, op=dist.ReduceOp.MAX)
    cm.wait()
    assert a.tolist() == [0.0] * 3, a
    same(b, expected(world, 4, torch.float32, REDUCE["MAX"]), "coalesced block")
    assert comm.seq == seq + 1, (comm.seq, seq)
    # send/recv in a block: one NCCL group, so crossing sends never wait for each other
    # (what torch's batch_isend_irecv does for its own groups)
    right, left = (rank + 1) % world, (rank - 1) % world
    got = torch.zeros(1 << 16)  # 256 KiB: more than the fake's 64 KiB mailbox
    with dist._coalescing_manager(pg, torch.device("cpu"), async_ops=True) as cm:
        dist.isend(torch.full((1 << 16,), float(rank)), right)
        dist.irecv(got, left)
    cm.wait()
    assert got[:2].tolist() == [float(left)] * 2 and comm.seq == seq + 2, got
    dist.destroy_process_group()
    return "ok"


def _dev():
    return int(os.environ["LOCAL_RANK"]) % _C.cuda_device_count()


@scenario
def streams(rank, world):
    """ProcessGroupNCCL's stream order, as the fake runtime logs it."""
    fastspawn.init_process_group()
    dist.all_reduce(torch.ones(1))
    comm = group()._cuda.communicators[_dev()]
    s = f"{comm.stream:#x}"
    t = torch.ones(4)
    fake_log_clear()
    work = dist.all_reduce(t, async_op=True)
    log = calls(fake_log(), "cudaEventRecord", "cudaStreamWaitEvent", "ncclAllReduce")
    ready = log[0][1]["event"]
    assert [(c, f.get("stream"), f.get("event")) for c, f in log] == [
        ("cudaEventRecord", "0x0", ready), ("cudaStreamWaitEvent", s, ready),
        ("ncclAllReduce", s, None), ("cudaEventRecord", s, log[3][1]["event"])], log
    end = log[3][1]["event"]
    fake_log_clear()
    work.wait()  # the caller's stream (0) waits for the end event
    log = calls(fake_log(), "cudaEventRecord", "cudaStreamWaitEvent")
    assert [(c, f["stream"], f["event"]) for c, f in log] == [
        ("cudaStreamWaitEvent", "0x0", end)], log
    # async_op=False: the same, in one call
    fake_log_clear()
    dist.broadcast(t, 0)
    log = calls(fake_log(), "cudaStreamWaitEvent")
    assert [f["stream"] for _, f in log] == [s, "0x0"], log
    assert comm.stream != 0 and comm.nonblocking
    dist.destroy_process_group()
    return "ok"


# -- deferred send / recv: queued, issued as one NCCL group when something needs them --

MIB = 1 << 18  # float32 elements in 1 MiB: far more than the fake's 64 KiB mailbox


def p2p_calls():
    """The fake's NCCL calls that matter for send / recv, in order."""
    names = ("ncclGroupStart", "ncclGroupEnd", "ncclSend", "ncclRecv", "ncclAllReduce")
    return [c for c, _ in calls(fake_log(), *names)]


GROUP = ["ncclGroupStart", "ncclSend", "ncclRecv", "ncclGroupEnd"]


def _p2p_setup(timeout=20):
    """A group whose communicator exists (the log from here is the scenario's), with a
    timeout that turns a regression (crossing sends waiting for each other) into the
    watchdog's error well within the test's time."""
    fastspawn.init_process_group(timeout=timedelta(seconds=timeout))
    dist.all_reduce(torch.ones(1))
    comm = group()._cuda.communicators[_dev()]
    fake_log_clear()
    return comm


@scenario
def p2p_batch(rank, world):
    """batch_isend_irecv, which torch 2.13 runs op by op on a Python group: 1 MiB each
    way in both directions around the ring, issued as one NCCL group at the first wait."""
    comm = _p2p_setup()
    seq = comm.seq
    right, left = (rank + 1) % world, (rank - 1) % world
    got_left, got_right = torch.zeros(MIB), torch.zeros(MIB)
    reqs = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, torch.full((MIB,), 10.0 * rank + 1), right),
        dist.P2POp(dist.isend, torch.full((MIB,), 10.0 * rank + 2), left),
        dist.P2POp(dist.irecv, got_left, left),
        dist.P2POp(dist.irecv, got_right, right)])
    assert len(reqs) == 4 and p2p_calls() == [] and comm.seq == seq  # queued, not issued
    for req in reqs:
        req.wait()
    log = p2p_calls()
    assert log == ["ncclGroupStart", "ncclSend", "ncclSend", "ncclRecv", "ncclRecv",
                   "ncclGroupEnd"], log
    assert comm.seq == seq + 1, (comm.seq, seq)  # one group, one work
    # what left sent to its right and right to its left, all of it
    assert got_left.eq(10.0 * left + 1).all() and got_right.eq(10.0 * right + 2).all()
    dist.destroy_process_group()
    return "ok"


@scenario
def p2p_ring(rank, world):
    """isend / irecv around a ring (each rank's send waits for its right neighbour's
    receive: issued alone, 1 MiB sends would wait in a circle), finished by wait(),
    get_future(), synchronize(), and by a blocking dist.recv that issues the queued
    isend with it."""
    _p2p_setup()
    right, left = (rank + 1) % world, (rank - 1) % world
    for finish in ("wait", "future", "synchronize", "blocking recv"):
        got = torch.zeros(MIB)
        mine = torch.full((MIB,), 100.0 * rank + len(finish))
        fake_log_clear()
        send = dist.isend(mine, right)
        if finish == "blocking recv":
            dist.recv(got, left)  # waits at once: the queued isend goes in the same group
            assert p2p_calls() == GROUP, (finish, p2p_calls())
            send.wait()
        else:
            recv = dist.irecv(got, left)
            assert p2p_calls() == [], (finish, p2p_calls())
            if finish == "wait":
                recv.wait()
                send.wait()
            elif finish == "future":
                assert recv.get_future().wait() == [got]
                send.get_future().wait()
            else:
                send.synchronize()
                recv.synchronize()
                recv.wait()
        assert p2p_calls() == GROUP, (finish, p2p_calls())  # issued once
        assert got.eq(100.0 * left + len(finish)).all(), (finish, got[:3])
    dist.destroy_process_group()
    return "ok"


@scenario
def p2p_then_collective(rank, world):
    """An isend (irecv on the peer) followed by an all_reduce on the same group: the send
    is issued first, in a group of its own, and its Work completes."""
    comm = _p2p_setup()
    seq = comm.seq
    buf = torch.full((MIB,), 5.0) if rank == 0 else torch.zeros(MIB)
    work = dist.isend(buf, 1) if rank == 0 else dist.irecv(buf, 0) if rank == 1 else None
    assert p2p_calls() == [], p2p_calls()
    t = torch.ones(3)
    dist.all_reduce(t)
    assert t.tolist() == [float(world)] * 3, t
    log = p2p_calls()
    one = "ncclSend" if rank == 0 else "ncclRecv"
    want = (["ncclGroupStart", one, "ncclGroupEnd"] if rank < 2 else []) + ["ncclAllReduce"]
    assert log == want, log
    if work is not None:
        work.wait()
        assert buf.eq(5.0).all(), buf[:3]
    assert comm.seq == seq + (2 if rank < 2 else 1), (comm.seq, seq)
    dist.destroy_process_group()
    return "ok"


@scenario
def p2p_coalescing(rank, world):
    """Queued sends and receives before a coalescing block are issued when it starts (as
    a group of their own); those inside it are part of its group, as before; torch's
    fast-path block (all_reduce calls, then allreduce_coalesced) issues them first too."""
    comm = _p2p_setup()
    pg, peer = group(), 1 - rank
    seq = comm.seq
    early = torch.zeros(MIB)
    queued = [dist.isend(torch.full((MIB,), 1.0 + rank), peer), dist.irecv(early, peer)]
    inside = torch.zeros(MIB)
    t = torch.ones(2)
    with dist._coalescing_manager(pg, torch.device("cpu"), async_ops=True) as cm:
        dist.isend(torch.full((MIB,), 3.0 + rank), peer)
        dist.irecv(inside, peer)
        dist.all_reduce(t)
    cm.wait()
    log = p2p_calls()
    # (torch 2.13 collects the block's all_reduce for an allreduce_coalesced: a nested group)
    block = [c for c in log[5:-1] if c not in ("ncclGroupStart", "ncclGroupEnd")]
    assert log[:4] == GROUP and log[4] == "ncclGroupStart" and log[-1] == "ncclGroupEnd", log
    assert block == ["ncclSend", "ncclRecv", "ncclAllReduce"], log
    for w in queued:
        w.wait()
    assert early.eq(1.0 + peer).all() and inside.eq(3.0 + peer).all() and t.tolist() == [2.0] * 2
    assert comm.seq == seq + 2 and p2p_calls() == log  # the waits issued nothing more
    fake_log_clear()
    late = torch.zeros(MIB)
    queued = [dist.isend(torch.full((MIB,), 7.0 + rank), peer), dist.irecv(late, peer)]
    ts = [torch.ones(1), torch.ones(2)]
    with dist._coalescing_manager():
        for x in ts:
            dist.all_reduce(x)
    log = p2p_calls()
    assert log == GROUP + ["ncclGroupStart", "ncclAllReduce", "ncclAllReduce", "ncclGroupEnd"], log
    for w in queued:
        w.wait()
    assert late.eq(7.0 + peer).all() and [x.tolist() for x in ts] == [[2.0], [2.0] * 2], ts
    dist.destroy_process_group()
    return "ok"


@scenario
def p2p_is_completed(rank, world):
    """Polling is_completed() on a queued send issues it (else it would never complete)."""
    _p2p_setup()
    peer, got = 1 - rank, torch.zeros(MIB)
    works = [dist.isend(torch.full((MIB,), 2.0 + rank), peer), dist.irecv(got, peer)]
    assert p2p_calls() == []
    deadline = time.monotonic() + 15
    while not all(w.is_completed() for w in works):
        assert time.monotonic() < deadline, "is_completed() never became True"
        time.sleep(0.005)
    assert p2p_calls() == GROUP and all(w.is_success() for w in works), p2p_calls()
    assert got.eq(2.0 + peer).all(), got[:3]
    dist.destroy_process_group()
    return "ok"


@scenario
def p2p_streams(rank, world):
    """Each queued op waits for the stream that was current when it was called (captured
    then, recorded when the group is issued); the waiter's stream waits for the group."""
    comm = _p2p_setup()
    rt = ctypes.CDLL(os.environ["FASTSPAWN_CUDART_LIBRARY"])

    def new_stream():
        s = ctypes.c_void_p()
        assert rt.cudaStreamCreateWithPriority(ctypes.byref(s), 1, 0) == 0
        return s.value

    half, current = group()._cuda, [0]
    streams = [new_stream() for _ in range(3)]

    class Streams(half._t):  # the test adapter, with a current stream of our choosing
        @staticmethod
        def stream(dev):
            return current[0]

    half._t = Streams
    peer, got = 1 - rank, torch.zeros(4)
    current[0] = streams[0]
    send = dist.isend(torch.full((4,), 1.0 + rank), peer)
    current[0] = streams[1]
    recv = dist.irecv(got, peer)
    current[0] = streams[2]
    fake_log_clear()
    recv.wait()
    send.wait()
    log = calls(fake_log(), "cudaEventRecord", "cudaStreamWaitEvent", "ncclSend", "ncclRecv")
    c, (a, b, waiter) = f"{comm.stream:#x}", (f"{s:#x}" for s in streams)
    assert [(n, f.get("stream")) for n, f in log] == [
        ("cudaEventRecord", a), ("cudaStreamWaitEvent", c), ("ncclSend", c),
        ("cudaEventRecord", b), ("cudaStreamWaitEvent", c), ("ncclRecv", c),
        ("cudaEventRecord", c), ("cudaStreamWaitEvent", waiter),
        ("cudaStreamWaitEvent", waiter)], log
    end = log[6][1]["event"]  # both waits order the waiter after the group's end event
    assert log[7][1]["event"] == log[8][1]["event"] == end, log
    assert got.tolist() == [1.0 + peer] * 4, got
    for s in streams:
        assert rt.cudaStreamDestroy(ctypes.c_void_p(s)) == 0
    dist.destroy_process_group()
    return "ok"


@scenario
def p2p_shutdown(rank, world):
    """destroy_process_group issues a send nobody waited for (rank 1's blocking recv gets
    it); an abort fails queued ones instead, naming it."""
    _p2p_setup()
    if rank == 0:
        dist.isend(torch.full((MIB,), 9.0), 1)  # never waited for
        dist.destroy_process_group()
        got = None
    else:
        buf = torch.zeros(MIB)
        dist.recv(buf, 0)
        got = float(buf[0]) if buf.eq(9.0).all() else buf[:3].tolist()
        dist.destroy_process_group()
    _p2p_setup()
    work = dist.isend(torch.ones(MIB), 1 - rank)
    group().abort()
    try:
        work.wait()
        aborted = "no error"
    except dist.DistBackendError as e:
        aborted = str(e)
    assert p2p_calls() == [], p2p_calls()  # never issued
    return [got, aborted]


@scenario
def errors(rank, world):
    """Bad input: clear TypeError / ValueError, and the group stays usable."""
    fastspawn.init_process_group()
    problems = {}

    def expect(exc, fn, *words):
        try:
            fn()
        except exc as e:
            msg = str(e)
            assert all(w in msg for w in words), (exc, words, msg)
            problems[fn.__name__ if fn.__name__ != "<lambda>" else words[0]] = msg
            return
        raise AssertionError(f"no {exc.__name__} for {words}")

    expect(TypeError, lambda: dist.all_reduce(torch.ones(2, dtype=torch.int16)), "int16",
           "cannot reduce")
    expect(ValueError, lambda: dist.all_reduce(torch.ones(2, dtype=torch.int32),
                                               op=dist.ReduceOp.BXOR), "bitwise", "BXOR")
    expect(ValueError, lambda: dist.all_reduce(torch.ones(4, 4).t()), "not a dense",
           ".contiguous()")
    expect(ValueError, lambda: group().broadcast([torch.ones(2)],
                                                 _opts("BroadcastOptions", rootRank=world)),
           "broadcast root", f"not in 0..{world - 1}")
    expect(ValueError, lambda: dist.all_gather([torch.zeros(2)] * (world + 1), torch.ones(2)),
           "needs", "tensors")
    expect(ValueError, lambda: dist.all_gather_into_tensor(torch.zeros(1), torch.ones(2)),
           "world_size")
    expect(ValueError, lambda: group().recv_anysource([torch.zeros(1)], 0), "any source")
    expect(TypeError, lambda: dist.all_reduce(torch.ones(2, dtype=torch.int64),
                                              op=dist._make_nccl_premul_sum(2.0)), "PREMUL_SUM")
    t = torch.ones(3)
    dist.all_reduce(t)  # still usable
    assert t.tolist() == [float(world)] * 3, t
    dist.destroy_process_group()
    return sorted(problems)


def _opts(name, **fields):
    o = getattr(torch._C._distributed_c10d, name)()
    for k, v in fields.items():
        setattr(o, k, v)
    return o


@scenario
def subgroups(rank, world):
    fastspawn.init_process_group()
    members = [0, world - 1]
    sub = dist.new_group(members)
    info = None
    if rank in members:
        t = torch.full((2,), float(rank))
        dist.all_reduce(t, group=sub)
        assert t.tolist() == [float(sum(members))] * 2, t
        comm = sub._cuda.communicators[_dev()]
        info = [comm.rank, comm.world_size, dist.get_rank(sub)]
    t = torch.ones(1)
    dist.all_reduce(t)  # the whole group still agrees
    assert t.item() == world
    dist.destroy_process_group()
    return info


@scenario
def ddp(rank, world):
    """Plain DistributedDataParallel: gradients are averaged over the ranks."""
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    fastspawn.init_process_group()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    reference = [p.detach().clone() for p in net.parameters()]
    model = DDP(net, bucket_cap_mb=0.0001)  # several buckets: several async all_reduces
    x = torch.full((4, 8), float(rank + 1))
    model(x).pow(2).sum().backward()
    # the same gradients, computed here for every rank's data
    local = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    grads = None
    for r in range(world):
        with torch.no_grad():
            for p, ref in zip(local.parameters(), reference, strict=True):
                p.copy_(ref)
        local.zero_grad()
        local(torch.full((4, 8), float(r + 1))).pow(2).sum().backward()
        g = [p.grad.clone() for p in local.parameters()]
        grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.allclose(p.grad, g / world, rtol=1e-5, atol=1e-6), (p.grad, g / world)
    digest = float(sum(p.grad.double().sum() for p in model.parameters()))
    dist.destroy_process_group()
    return digest


@scenario
def lazy(rank, world):
    """Nothing is loaded or connected before the first collective on a device."""
    fastspawn.init_process_group()
    before = loaded()
    assert group()._cuda.communicators == {}
    dist.all_reduce(torch.ones(1))
    after = loaded()
    comms = group()._cuda.communicators
    dist.destroy_process_group()
    return [before, after, sorted(comms)]


@scenario
def eager(rank, world):
    """init_process_group(device_id=...) creates the communicator at once. This machine has
    no accelerator, so torch is told it has one (the rest of torch's path is its own)."""
    torch.accelerator.current_accelerator = lambda *a, **k: torch.device("cuda")
    torch.accelerator.device_count = lambda: world
    fastspawn.init_process_group(device_id=torch.device("cuda", rank))
    comms = group()._cuda.communicators
    inits = calls(fake_log(), "ncclCommInitRankConfig")
    t = torch.ones(2)
    dist.all_reduce(t)
    assert t.tolist() == [float(world)] * 2
    dist.destroy_process_group()
    return [sorted(comms), len(inits)]


@scenario
def watchdog(rank, world):
    """A collective that never completes: the watchdog fails it after the group timeout."""
    fastspawn.init_process_group(timeout=timedelta(seconds=3))
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4))
        raise AssertionError("the stuck all_reduce returned")
    except dist.DistBackendError as e:
        first = str(e)
    took = time.monotonic() - t0
    try:  # the error is sticky
        dist.broadcast(torch.ones(1), 0)
        raise AssertionError("usable after the watchdog aborted it")
    except dist.DistBackendError as e:
        again = str(e)
    return [first, again == first, took]


@scenario
def async_error(rank, world):
    """NCCL reports an asynchronous error (FAKE_NCCL_ASYNC_ERROR): at the enqueue, or
    the watchdog sees it within its interval; every later call fails with it."""
    fastspawn.init_process_group()
    try:
        dist.all_reduce(torch.ones(4))
        time.sleep(0.5)  # > the watchdog's 100 ms
        dist.all_reduce(torch.ones(4))
        return "no error"
    except dist.DistBackendError as e:
        return str(e)


@scenario
def dead_peer(rank, world):
    """A rank that exits while the others run a collective: an error, not a hang."""
    fastspawn.init_process_group()
    dist.all_reduce(torch.ones(1))
    if rank == world - 1:
        os._exit(0)
    time.sleep(0.3)
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        return "no error"
    except dist.DistBackendError as e:
        return [str(e), time.monotonic() - t0]


@scenario
def cpu_only(rank, world):
    """Not in test mode: CPU tensors stay on shared memory and nothing CUDA loads."""
    fastspawn.init_process_group()
    t = torch.ones(3)
    dist.all_reduce(t)
    outs = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(outs, torch.ones(1))
    dist.barrier()
    p2p = []  # CPU tensors' send / recv: not supported, before and after deferral
    for fn in (dist.isend, dist.irecv, dist.send, dist.recv):
        try:
            fn(torch.ones(1), 1 - rank)
            p2p.append("no error")
        except NotImplementedError as e:
            p2p.append(str(e))
    comms = group()._cuda.communicators
    state = loaded()
    dist.destroy_process_group()
    return [t.tolist(), comms == {}, state, _C.cuda_library_path(), p2p]


def main():
    name, world = sys.argv[1], int(sys.argv[2])
    fn = SCENARIOS[name]

    def rank_main(i):
        # a rank still running long after it should have finished shows where it is
        faulthandler.dump_traceback_later(float(os.environ.get("SCENARIO_STACKS_AFTER", 60)))
        return fn(i, world)

    results = fastspawn.spawn(rank_main, nprocs=world)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
