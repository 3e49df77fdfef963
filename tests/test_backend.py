"""The "fastspawn" torch.distributed backend (python/fastspawn/backend.py).

Ranks are forked with multiprocessing and meet through a dist.FileStore. Each rank
checks its own results against values computed locally in the same reduction order
(so equal results are also bit-identical across ranks) and returns digests the
test compares across ranks. The parent process runs no torch ops (fork safety).
"""
import hashlib
import multiprocessing
import os
import signal
import tempfile
import time
import traceback

import pytest

JOIN_TIMEOUT = 120


def _rank_main(fn, rank, world, path, args, queue, init):
    try:
        import torch
        import torch.distributed as dist

        import fastspawn.backend  # noqa: F401 - registers "fastspawn"

        torch.set_num_threads(1)
        if init:
            store = dist.FileStore(path, world)
            dist.init_process_group("fastspawn", store=store, rank=rank, world_size=world,
                                    timeout=init)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()  # flush before _exit
        os._exit(0)


def run_ranks(fn, world, *args, timeout=JOIN_TIMEOUT, init=True, expect=None):
    """Run fn(rank, world, *args) in `world` forked ranks of one fastspawn group.

    Returns the results by rank. `expect`: ranks allowed to report nothing (they die).
    """
    from datetime import timedelta

    init_timeout = timedelta(seconds=30) if init else None
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main,
                             args=(fn, r, world, path, args, queue, init_timeout))
                 for r in range(world)]
        for p in procs:
            p.start()
        results, errors = {}, []
        deadline = time.monotonic() + timeout
        silent = set(expect or ())
        try:
            while len(results) + len(errors) < world - len(silent):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"ranks did not finish in {timeout} s: got {sorted(results)}")
                try:
                    rank, status, value = queue.get(timeout=min(left, 1.0))
                except Exception:  # noqa: BLE001 - queue.Empty
                    continue
                if status == "ok":
                    results[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
        finally:
            for p in procs:
                p.join(timeout=max(1.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(5)
        assert not errors, "\n".join(errors)
        return [results.get(r) for r in range(world)]


def digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Collectives against local results
# ---------------------------------------------------------------------------

def _inputs(world, shape, dtype, seed):
    """Every rank's input, the same on every rank."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(world):
        if dtype.is_floating_point:
            x = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * 8
        elif dtype == torch.bool:
            x = torch.randint(0, 2, shape, generator=g)
        else:
            info = torch.iinfo(dtype)
            x = torch.randint(max(info.min, -100), min(info.max, 100), shape, generator=g)
        out.append(x.to(dtype))
    return out


def _reference(xs, op_name, dtype):
    """The reduction in rank order, in the precision the backend uses."""
    import torch

    acc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    acc = xs[0].to(acc_dtype)
    for x in xs[1:]:
        x = x.to(acc_dtype)
        if dtype == torch.bool:
            acc = {"SUM": acc | x, "MAX": acc | x, "BOR": acc | x, "MIN": acc & x,
                   "PRODUCT": acc & x, "BAND": acc & x, "BXOR": acc ^ x}[op_name]
        elif op_name in ("SUM", "AVG"):
            acc = acc + x
        elif op_name == "PRODUCT":
            acc = acc * x
        elif op_name == "MIN":
            acc = torch.minimum(acc, x)
        elif op_name == "MAX":
            acc = torch.maximum(acc, x)
        elif op_name == "BAND":
            acc = acc & x
        elif op_name == "BOR":
            acc = acc | x
        elif op_name == "BXOR":
            acc = acc ^ x
    if op_name == "AVG":
        acc = acc / len(xs)
    return acc.to(dtype)


def _all_collectives(rank, world):
    import torch
    import torch.distributed as dist

    R = dist.ReduceOp
    ops = {"SUM": R.SUM, "AVG": R.AVG, "MIN": R.MIN, "MAX": R.MAX, "PRODUCT": R.PRODUCT,
           "BAND": R.BAND, "BOR": R.BOR, "BXOR": R.BXOR}
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
              torch.uint8, torch.int32, torch.int64, torch.bool]
    digests = []
    seed = 0
    for dtype in dtypes:
        for name, op in ops.items():
            floating = dtype.is_floating_point
            if (name == "AVG" and not floating) or (name in ("BAND", "BOR", "BXOR") and floating):
                continue
            for n in (0, 1, 7, 1023, 3 * world + 1, 70001):
                seed += 1
                xs = _inputs(world, (n,), dtype, seed)
                t = xs[rank].clone()
                dist.all_reduce(t, op=op)
                want = _reference(xs, name, dtype)
                assert torch.equal(t, want), (name, dtype, n)
                digests.append(digest(t))
    # reduce to a root, broadcast, gathers, scatters
    for n in (0, 5, 40000):
        for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.int16):
            seed += 1
            xs = _inputs(world, (n, 3), dtype if dtype != torch.int16 else torch.int32, seed)
            xs = [x.to(dtype) for x in xs]
            root = seed % world
            if dtype != torch.int16:
                t = xs[rank].clone()
                dist.reduce(t, dst=root, op=R.MAX)
                if rank == root:
                    assert torch.equal(t, _reference(xs, "MAX", dtype))
            t = xs[rank].clone()
            dist.broadcast(t, src=root)
            assert torch.equal(t, xs[root])
            out = [torch.empty_like(xs[0]) for _ in range(world)]
            dist.all_gather(out, xs[rank])
            assert all(torch.equal(o, x) for o, x in zip(out, xs, strict=True))
            flat = torch.empty((world * n, 3), dtype=dtype)
            dist.all_gather_into_tensor(flat, xs[rank])
            assert torch.equal(flat, torch.cat(xs))
            gl = [torch.empty_like(xs[0]) for _ in range(world)] if rank == root else None
            dist.gather(xs[rank], gl, dst=root)
            if rank == root:
                assert all(torch.equal(o, x) for o, x in zip(gl, xs, strict=True))
            pieces = [x + 0 for x in xs] if rank == root else None
            got = torch.empty_like(xs[0])
            dist.scatter(got, pieces, src=root)
            assert torch.equal(got, xs[rank])
            if dtype != torch.int16:
                big = _inputs(world, (world * n, 3), dtype, seed + 1000)
                out = torch.empty_like(xs[0])
                dist.reduce_scatter_tensor(out, big[rank].clone())
                want = _reference(big, "SUM", dtype)[rank * n:(rank + 1) * n]
                assert torch.equal(out, want)
                out2 = torch.empty_like(xs[0])
                dist.reduce_scatter(out2, list(big[rank].clone().chunk(world)))
                assert torch.equal(out2, want)
            digests.append(digest(t, flat))
    # all_to_all: equal and uneven splits
    t_in = torch.arange(world * 4, dtype=torch.float32) + 100 * rank
    t_out = torch.empty_like(t_in)
    dist.all_to_all_single(t_out, t_in)
    want = torch.cat([torch.arange(rank * 4, rank * 4 + 4, dtype=torch.float32) + 100 * q
                      for q in range(world)])
    assert torch.equal(t_out, want)
    send_splits = [q + rank + 1 for q in range(world)]  # rank r sends q + r + 1 rows to q
    recv_splits = [rank + q + 1 for q in range(world)]
    t_in = torch.cat([torch.full((s, 2), float(10 * rank + q)) for q, s in enumerate(send_splits)])
    t_out = torch.empty((sum(recv_splits), 2))
    dist.all_to_all_single(t_out, t_in, recv_splits, send_splits)
    want = torch.cat([torch.full((s, 2), float(10 * q + rank)) for q, s in enumerate(recv_splits)])
    assert torch.equal(t_out, want)
    ins = [torch.full((q + 1,), rank * 1.0 + q) for q in range(world)]
    outs = [torch.empty(rank + 1) for _ in range(world)]
    dist.all_to_all(outs, ins)
    assert all(torch.equal(o, torch.full((rank + 1,), q * 1.0 + rank)) for q, o in enumerate(outs))
    # non-contiguous tensors, complex, other dtypes moved as bytes
    m = torch.arange(12.0).reshape(3, 4).t() * (rank + 1)
    dist.all_reduce(m)
    assert torch.equal(m, torch.arange(12.0).reshape(3, 4).t() * (world * (world + 1) // 2))
    c = torch.tensor([1 + 2j, 3 - 1j]) * (rank + 1)
    dist.all_reduce(c)
    assert torch.equal(c, torch.tensor([1 + 2j, 3 - 1j]) * (world * (world + 1) // 2))
    s = torch.arange(6, dtype=torch.int16) * (rank + 7)
    dist.broadcast(s, src=0)
    assert torch.equal(s, torch.arange(6, dtype=torch.int16) * 7)
    dist.barrier()
    return digests


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_match_local_results(world):
    results = run_ranks(_all_collectives, world)
    assert all(r == results[0] for r in results)  # bit-identical on every rank


def _big_float_sums(rank, world):
    import torch
    import torch.distributed as dist

    out = []
    for n, dtype in ((1000, torch.float32), (3_000_001, torch.float32),
                     (3_000_001, torch.bfloat16), (777, torch.float16)):
        g = torch.Generator().manual_seed(rank)
        x = torch.rand(n, generator=g) - 0.5  # drawn before the scales, as it always was
        x = x * torch.pow(10.0, torch.randint(-6, 6, (n,), generator=g))
        x = x.to(dtype)
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            t = x.clone()
            dist.all_reduce(t, op=op)
            out.append(digest(t))
    return out


def test_results_bit_identical_across_ranks():
    results = run_ranks(_big_float_sums, 4)
    assert all(r == results[0] for r in results)


def test_registration():
    import torch.distributed as dist

    import fastspawn.backend as fb

    assert "fastspawn" in dist.Backend.backend_list
    assert dist.Backend.FASTSPAWN == "fastspawn"
    fb.register()  # idempotent
    pg = run_ranks(_backend_name, 2)
    assert pg == [("fastspawn", "fastspawn")] * 2


def _backend_name(rank, world):
    import torch.distributed as dist

    return dist.get_backend(), dist.group.WORLD.name()


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

def _mismatch(rank, world):
    import torch
    import torch.distributed as dist

    t = torch.ones(10 if rank == 0 else 12)
    start = time.monotonic()
    try:
        dist.all_reduce(t)
    except RuntimeError as e:
        msg = str(e)
    else:
        raise AssertionError("a size mismatch did not raise")
    assert "disagree" in msg and "rank 1 called" in msg and "12 elements" in msg, msg
    assert time.monotonic() - start < 5
    try:  # the group is aborted: later calls fail fast
        dist.barrier()
    except RuntimeError as e:
        return str(e)
    raise AssertionError("a call after the mismatch did not raise")


def test_mismatch_raises_on_every_rank():
    msgs = run_ranks(_mismatch, 2)
    assert all("abort" in m or "unusable" in m for m in msgs), msgs


def _peer_dies(rank, world, how):
    import torch
    import torch.distributed as dist

    dist.barrier()
    if rank == world - 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)  # exits without a word, status 0
    t = torch.ones(1 << 16)
    start = time.monotonic()
    work = dist.all_reduce(t, async_op=True)
    try:
        work.wait()
    except RuntimeError as e:
        msg = str(e)
    else:
        raise AssertionError("a dead peer did not raise")
    took = time.monotonic() - start
    assert f"rank {world - 1}" in msg, msg
    assert isinstance(work.exception(), RuntimeError)
    assert took < 3, took
    fut_exc = None
    try:
        work.get_future().wait()
    except RuntimeError as e:
        fut_exc = str(e)
    assert fut_exc is not None
    return msg


@pytest.mark.parametrize("how", ["kill", "exit0"])
def test_peer_death_raises(how):
    msgs = run_ranks(_peer_dies, 3, how, expect=[2])
    assert all("rank 2" in m for m in msgs[:2])


def _bad_inputs(rank, world):
    import torch
    import torch.distributed as dist

    errors = []
    for call in (lambda: dist.all_reduce(torch.ones(3, dtype=torch.int16)),
                 lambda: dist.all_reduce(torch.ones(3, dtype=torch.int32), op=dist.ReduceOp.AVG),
                 lambda: dist.all_reduce(torch.ones(3), op=dist.ReduceOp.BXOR),
                 lambda: dist.all_reduce(torch.ones(3, device="meta"))):
        try:
            call()
        except (TypeError, ValueError) as e:
            errors.append(type(e).__name__ + ": " + str(e))
    # rejected calls did not touch the group
    t = torch.ones(3)
    dist.all_reduce(t)
    assert t.tolist() == [float(world)] * 3
    return errors


def test_bad_inputs_raise_clear_errors():
    errors = run_ranks(_bad_inputs, 2)[0]
    assert len(errors) == 4, errors
    assert "int16" in errors[0]
    assert "AVG" in errors[1]
    assert "BXOR" in errors[2]
    assert "CPU" in errors[3] and "meta" in errors[3]


# ---------------------------------------------------------------------------
# Async work
# ---------------------------------------------------------------------------

def _async(rank, world):
    import threading

    import torch
    import torch.distributed as dist

    n = 1 << 20  # above the inline size: goes through the worker and completion threads
    ts = [torch.full((n,), float(rank + i)) for i in range(6)]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    seen = []
    fut = works[2].get_future().then(lambda f: seen.append(threading.current_thread().name))
    for i, (w, t) in enumerate(zip(works, ts, strict=True)):
        w.wait()
        assert w.is_completed() and w.is_success()
        assert torch.equal(t, torch.full((n,), float(sum(r + i for r in range(world)))))
    fut.wait()
    assert seen, "future callback did not run"
    value = works[0].get_future().wait()
    assert value[0] is ts[0]
    # small async ops complete too, in order with the large ones
    small = [torch.ones(4) * rank for _ in range(3)]
    ws = [dist.all_reduce(s, async_op=True) for s in small]
    big = torch.ones(n)
    wb = dist.all_reduce(big, async_op=True)
    for w in ws + [wb]:
        w.wait()
    assert all(torch.equal(s, torch.full((4,), float(sum(range(world))))) for s in small)
    b = torch.arange(5.0) if rank == 0 else torch.zeros(5)
    dist.broadcast(b, src=0, async_op=True).wait()
    assert torch.equal(b, torch.arange(5.0))
    return True


def test_async_work_and_futures():
    assert run_ranks(_async, 3) == [True] * 3


def _reinit(rank, world, path):
    import torch
    import torch.distributed as dist

    store = dist.FileStore(path + ".again", world)
    for i in range(3):
        dist.init_process_group("fastspawn", store=store, rank=rank, world_size=world)
        t = torch.ones(3) * i
        dist.all_reduce(t)
        assert t.tolist() == [i * world] * 3
        sub = dist.new_group([0, 1])
        if rank in (0, 1):
            u = torch.ones(2)
            dist.all_reduce(u, group=sub)
            assert u.tolist() == [2.0, 2.0]
        dist.destroy_process_group()
    if not hasattr(dist.ProcessGroup, "shutdown"):
        # A torch without ProcessGroup.shutdown (2.1) shuts no group down in
        # destroy_process_group(): a group's backend (ours as gloo's) lives until its
        # last reference goes, here the variable `sub`.
        del sub
    # nothing of the segments is left with this rank: no fd, no mapping, no store key
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")]
    with open("/proc/self/maps") as fh:
        maps = [line for line in fh if "memfd:fastspawn" in line or "/dev/shm/fastspawn" in line]
    keys = [_store_has(store, f"fastspawn/shm_handle/{g}") for g in range(6)] if rank == 0 else []
    return [f for f in fds if "fastspawn" in f] + maps + [k for k in keys if k]


def _store_has(store, key):
    """store.check([key]), also on torch 2.1, whose FileStore has no check()."""
    if hasattr(store, "check"):
        return store.check([key])
    from datetime import timedelta
    try:
        store.wait([key], timedelta(milliseconds=100))
    except RuntimeError:  # DistStoreError on newer torch: the key is absent
        return False
    return True


def test_reinit_subgroups_and_no_leftover_segments():
    before = {n for n in os.listdir("/dev/shm") if n.startswith("fastspawn")}
    with tempfile.TemporaryDirectory() as tmp:
        left = run_ranks(_reinit, 3, os.path.join(tmp, "s"), init=False)
    assert left == [[], [], []]
    assert {n for n in os.listdir("/dev/shm") if n.startswith("fastspawn")} <= before


# ---------------------------------------------------------------------------
# DDP: same parameters as DDP on gloo
# ---------------------------------------------------------------------------

def _ddp_vs_gloo(rank, world, kw, steps, accumulate):
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    gloo = dist.new_group(backend="gloo")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 64)
            self.b = nn.Linear(64, 64)
            if kw.get("find_unused_parameters"):
                self.unused = nn.Linear(64, 64)  # never gets a gradient
            self.c = nn.Linear(64, 4)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    def train(group):
        torch.manual_seed(0)
        model = Net()
        if rank == 1:  # DDP's initial broadcast must fix this
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        ddp = DDP(model, process_group=group, **kw)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(steps):
            opt.zero_grad()
            if accumulate:
                with ddp.no_sync():
                    ddp(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
            ddp(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    ours = train(dist.group.WORLD)
    theirs = train(gloo)
    same = all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    close = all(torch.allclose(a, b, rtol=1e-6, atol=1e-7)
                for a, b in zip(ours, theirs, strict=True))
    return same, close, digest(*ours)


@pytest.mark.parametrize("kw,accumulate", [
    ({}, False),
    ({"bucket_cap_mb": 0.01, "find_unused_parameters": True}, False),
    ({"gradient_as_bucket_view": True, "bucket_cap_mb": 0.02}, True),
    ({"static_graph": True}, False),
])
def test_ddp_matches_gloo(kw, accumulate):
    results = run_ranks(_ddp_vs_gloo, 2, kw, 4, accumulate)
    for same, _close, _ in results:
        assert same, "parameters differ from DDP on gloo"
    assert results[0][2] == results[1][2]  # replicas stay bit-identical


def _fork_in_rank(rank, world):
    import torch
    import torch.distributed as dist

    t = torch.ones(4)
    dist.all_reduce(t, async_op=True)  # the completion thread may be running
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # e.g. a DataLoader worker: the group is not usable here
        os.close(r)
        try:
            dist.all_reduce(torch.ones(4))
            msg = "no error"
        except Exception as e:  # noqa: BLE001
            msg = str(e)
        os.write(w, msg.encode()[:500])
        os.close(w)
        import atexit

        atexit._run_exitfuncs()  # as at exit: must not close the parent's communicator
        os._exit(0)
    os.close(w)
    msg = os.read(r, 1000).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and "forked" in msg, (status, msg)
    for _ in range(3):  # the parent's group still works, the peers noticed nothing
        u = torch.ones(4)
        dist.all_reduce(u)
        assert u.tolist() == [float(world)] * 4
    return True


def test_forked_child_cannot_use_the_group():
    assert run_ranks(_fork_in_rank, 2) == [True, True]


def _extended_api(rank, world, path):
    import torch
    import torch.distributed as dist

    import fastspawn.backend as fb

    try:
        dist.Backend.register_backend("fastspawn_ext", fb._create, extended_api=True,
                                      devices=["cpu"])
    except TypeError:  # a torch without extended_api: nothing to check
        return True
    store = dist.FileStore(path, world)
    dist.init_process_group("fastspawn_ext", store=store, rank=rank, world_size=world)
    t = torch.ones(3) * (rank + 1)
    dist.all_reduce(t)
    assert t.tolist() == [3.0] * 3
    dist.destroy_process_group()
    return True


def test_extended_api_creator():
    with tempfile.TemporaryDirectory() as tmp:
        assert run_ranks(_extended_api, 2, os.path.join(tmp, "s"), init=False) == [True, True]


def _without_options(rank, world):
    import torch
    import torch.distributed as dist

    pg = dist.group.WORLD  # called as torch 2.1 calls them: no option structs
    x = torch.ones(2) * (rank + 1)
    total = float(sum(range(1, world + 1)))
    pg.allreduce([x]).wait()
    assert x.tolist() == [total] * 2
    ys = [torch.ones(2), torch.ones(1)]
    pg.allreduce_coalesced(ys).wait()
    assert [y.tolist() for y in ys] == [[float(world)] * 2, [float(world)]]
    r = torch.ones(2)
    pg.reduce([r]).wait()  # root 0
    assert r.tolist() == ([float(world)] * 2 if rank == 0 else [1.0, 1.0])
    b = torch.full((3,), float(rank))
    pg.broadcast([b]).wait()
    assert b.tolist() == [0.0] * 3
    outs = [torch.empty(2) for _ in range(world)]
    pg.allgather([outs], [torch.full((2,), float(rank))]).wait()
    assert [o.tolist() for o in outs] == [[float(q)] * 2 for q in range(world)]
    flat = torch.empty(2 * world)
    pg._allgather_base(flat, torch.full((2,), float(rank))).wait()
    assert flat.tolist() == [float(q) for q in range(world) for _ in range(2)]
    rs = torch.empty(2)
    pg.reduce_scatter([rs], [[torch.ones(2) for _ in range(world)]]).wait()
    assert rs.tolist() == [float(world)] * 2
    rs2 = torch.empty(2)
    pg._reduce_scatter_base(rs2, torch.ones(2 * world)).wait()
    assert rs2.tolist() == [float(world)] * 2
    g = [[torch.empty(1) for _ in range(world)]] if rank == 0 else []
    pg.gather(g, [torch.full((1,), float(rank))]).wait()
    if rank == 0:
        assert [t.item() for t in g[0]] == [float(q) for q in range(world)]
    s = torch.empty(1)
    pieces = [[torch.full((1,), float(q)) for q in range(world)]] if rank == 0 else []
    pg.scatter([s], pieces).wait()
    assert s.item() == float(rank)
    a_out = [torch.empty(1) for _ in range(world)]
    pg.alltoall(a_out, [torch.full((1,), float(10 * rank + q)) for q in range(world)]).wait()
    assert [t.item() for t in a_out] == [float(10 * q + rank) for q in range(world)]
    a2 = torch.empty(world)
    pg.alltoall_base(a2, torch.arange(world, dtype=torch.float32) + 10 * rank, [], []).wait()
    assert a2.tolist() == [float(10 * q + rank) for q in range(world)]
    pg.barrier().wait()
    return True


def test_collectives_without_option_structs():
    assert run_ranks(_without_options, 2, timeout=60) == [True, True]


# ---------------------------------------------------------------------------
# C++ callers (DDP's helpers) and the Works they hold
# ---------------------------------------------------------------------------

def _cpp_callers(rank, world):
    import torch
    import torch.distributed as dist
    from torch.distributed.utils import _verify_param_shape_across_processes

    pg = dist.group.WORLD
    # C++ calls allgather, then wait() on the Work: on a torch that drops the
    # Python half of a Work returned to C++ (2.1) this blocked forever.
    _verify_param_shape_across_processes(pg, [torch.ones(3, 2), torch.ones(5)])
    ts = [torch.full((n,), float(rank + 1)) for n in (3, 70000, 1)]
    dist._broadcast_coalesced(pg, ts, 1 << 10, 1)  # small buffer: several broadcasts
    assert all(torch.equal(t, torch.full_like(t, 2.0)) for t in ts)
    pins = pg._engine.pins
    return pins if pins is None else len(pins)


def test_cpp_callers_wait_on_python_works():
    # All pinned Works were waited on by C++ and let go.
    assert run_ranks(_cpp_callers, 2, timeout=60) in ([None, None], [0, 0])


def _pinned_works(rank, world, path):
    import torch
    import torch.distributed as dist

    import fastspawn.backend as fb

    fb._keeps_python_works = False  # as on torch 2.1, whatever this torch does
    fb._PIN_CAP = 8
    dist.init_process_group("fastspawn", store=dist.FileStore(path, world), rank=rank,
                            world_size=world)
    pins = dist.group.WORLD._engine.pins
    assert pins == {}
    ts = [torch.ones(1 << 17) for _ in range(3)]  # above the inline size: queued
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    assert len(pins) == 3
    works[0].wait()
    works[1].get_future().wait()
    assert set(pins.values()) == {works[2]}
    works[2].wait()
    for _ in range(20):  # dropped without wait(): at most _PIN_CAP stay pinned
        dist.all_reduce(torch.ones(4), async_op=True)
    assert len(pins) == 8
    w = dist.all_reduce(torch.ones(4), async_op=True)
    assert id(w) in pins and len(pins) == 8  # the oldest made room
    w.wait()
    assert id(w) not in pins and len(pins) == 7
    # C++ callers still find their Works
    _cpp_callers(rank, world)
    dist.destroy_process_group()
    return [t[0].item() for t in ts]


def test_works_pinned_until_waited_and_bounded():
    with tempfile.TemporaryDirectory() as tmp:
        got = run_ranks(_pinned_works, 2, os.path.join(tmp, "s"), init=False, timeout=60)
    assert got == [[2.0, 2.0, 2.0]] * 2
