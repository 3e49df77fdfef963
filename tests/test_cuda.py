"""GPU checks: run where CUDA is present (skipped cleanly elsewhere).

One GPU means world size 1 for NCCL (it refuses two ranks on one device): the
multi-rank logic of the CUDA half is tested on CPUs against the fake NCCL
(tests/test_nccl_backend.py); here the real runtime, streams and NCCL. Ranks start
from the zygote: this process asked torch.cuda.is_available(), which may have
initialised the driver, and a child forked after that cannot use CUDA.
"""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import fastspawn
from conftest import PACKAGE_DIR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def nccl_rank(i):
    fastspawn.init_process_group()
    dev = torch.cuda.current_device()
    gpu = torch.full((4,), float(i + 1), device="cuda")
    dist.all_reduce(gpu)
    cpu = torch.full((4,), float(i + 1))
    dist.all_reduce(cpu)
    out = (dist.get_backend(), dev, gpu.cpu().tolist(), cpu.tolist())
    dist.destroy_process_group()
    return out


def plain_nccl_rank(i):
    dist.init_process_group("nccl", store=fastspawn.Store.from_env(), rank=0, world_size=1)
    t = torch.ones(2, device="cuda")
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.cpu().tolist()


def test_init_process_group_uses_fastspawn_for_cuda_and_sets_the_device():
    (backend, dev, gpu, cpu), = fastspawn.spawn(nccl_rank, nprocs=1, start_method="zygote")
    assert backend == "fastspawn" and dev == 0
    assert gpu == [1.0] * 4 and cpu == [1.0] * 4


def test_nccl_rendezvous_through_fastspawn_store():
    # A temporary Store: NCCL uses it lazily, after the Python object is gone
    # (see docs/design.md, "NCCL and the store").
    assert fastspawn.spawn(plain_nccl_rank, nprocs=1, start_method="zygote") == [[1.0, 1.0]]


def test_parent_with_cuda_uses_the_zygote_and_refuses_fork():
    # In a separate launcher: CUDA initialised in this test process would make
    # every later fork test refuse to fork.
    code = """
import torch, fastspawn
from fastspawn._launch import _resolve_start_method
import tests_cuda_ranks as r
torch.zeros(1, device="cuda")
assert torch.cuda.is_initialized()
assert _resolve_start_method("auto") == "zygote"
try:
    fastspawn.spawn(r.nccl_rank, nprocs=1, start_method="fork")
    raise SystemExit("fork was not refused")
except RuntimeError as e:
    assert "CUDA is initialised" in str(e)
out = fastspawn.spawn(r.nccl_rank, nprocs=1)
assert out[0][2] == [1.0] * 4, out
print("ok")
"""
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_DIR, os.path.dirname(__file__)]))
    out = subprocess.run([sys.executable, "-c", code.replace("tests_cuda_ranks", "test_cuda")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


# ---------------------------------------------------------------------------
# fastspawn's group on real CUDA tensors (world size 1)
# ---------------------------------------------------------------------------

def _pg():
    return dist.distributed_c10d._get_default_group()


def collectives_rank(i):
    """Every collective on CUDA tensors; at world size 1 the results are known exactly."""
    from fastspawn import _C

    def cuda_libs():
        return {line.split()[-1] for line in open("/proc/self/maps")
                if "libnccl" in line or "libcudart" in line}

    torch_libs = cuda_libs()
    fastspawn.init_process_group()
    out = {"backend": dist.get_backend(), "config": dist.get_backend_config()}
    assert _pg()._cuda.communicators == {}  # nothing before the first CUDA collective
    x = torch.arange(1, 9, device="cuda", dtype=torch.float32)
    dist.all_reduce(x)
    assert x.tolist() == list(range(1, 9))
    # torch's own NCCL and runtime were reused: nothing new was mapped
    out["nccl"] = _C.nccl_library_path()
    out["reused"] = cuda_libs() == torch_libs and out["nccl"] in torch_libs
    comm = _pg()._cuda.communicators[0]
    out["nonblocking"] = comm.nonblocking
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
                  torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2):
        t = torch.arange(1, 5, device="cuda").to(dtype)
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN):
            dist.all_reduce(t, op=op)
        assert t.float().tolist() == [1.0, 2.0, 3.0, 4.0], dtype
    t = torch.full((5,), 4.0, device="cuda")
    dist.all_reduce(t, op=dist._make_nccl_premul_sum(0.5))  # host factor
    dist.all_reduce(t, op=dist._make_nccl_premul_sum(torch.tensor([0.25], device="cuda")))
    assert t.tolist() == [0.5] * 5, t
    dist.all_reduce(t, op=dist.ReduceOp.AVG)
    assert t.tolist() == [0.5] * 5
    c = torch.complex(torch.ones(3, device="cuda"), torch.ones(3, device="cuda"))
    dist.all_reduce(c)
    assert c.real.tolist() == [1.0] * 3
    b = torch.arange(6, device="cuda", dtype=torch.int16)
    dist.broadcast(b, 0)
    assert b.tolist() == list(range(6))
    outs = [torch.zeros(3, device="cuda")]
    dist.all_gather(outs, torch.full((3,), 7.0, device="cuda"))
    assert outs[0].tolist() == [7.0] * 3
    flat = torch.zeros(4, device="cuda")
    dist.all_gather_into_tensor(flat, torch.arange(4.0, device="cuda"))
    assert flat.tolist() == [0.0, 1.0, 2.0, 3.0]
    rs = torch.zeros(4, device="cuda")
    dist.reduce_scatter_tensor(rs, torch.arange(4.0, device="cuda"))
    assert rs.tolist() == [0.0, 1.0, 2.0, 3.0]
    rs = torch.zeros(2, device="cuda")
    dist.reduce_scatter(rs, [torch.full((2,), 3.0, device="cuda")])
    assert rs.tolist() == [3.0, 3.0]
    r = torch.full((2,), 5.0, device="cuda")
    dist.reduce(r, 0, op=dist.ReduceOp.PRODUCT)
    assert r.tolist() == [5.0, 5.0]
    g = [torch.zeros(2, device="cuda")]
    dist.gather(torch.full((2,), 9.0, device="cuda"), g, dst=0)
    sc = torch.zeros(2, device="cuda")
    dist.scatter(sc, [torch.full((2,), 8.0, device="cuda")], src=0)
    assert g[0].tolist() == [9.0, 9.0] and sc.tolist() == [8.0, 8.0]
    a2a = torch.zeros(6, 2, device="cuda")
    dist.all_to_all_single(a2a, torch.ones(6, 2, device="cuda"), [6], [6])
    lst = [torch.zeros(3, device="cuda")]
    dist.all_to_all(lst, [torch.full((3,), 2.0, device="cuda")])
    assert a2a.sum().item() == 12.0 and lst[0].tolist() == [2.0] * 3
    with dist._coalescing_manager():
        ts = [torch.ones(k + 1, device="cuda") for k in range(3)]
        for t in ts:
            dist.all_reduce(t)
    assert [t.sum().item() for t in ts] == [1.0, 2.0, 3.0]
    dist.barrier(device_ids=[0])
    dist.barrier()
    work = dist.all_reduce(torch.ones(2, device="cuda"), async_op=True)
    work.synchronize()
    assert work.is_completed() and work.is_success()
    # the CPU half is still shared memory, in the same group
    cpu = torch.ones(3)
    dist.all_reduce(cpu)
    out["cpu"] = cpu.tolist()
    out["bad_device"] = ""
    try:
        dist.all_gather_into_tensor(torch.zeros(4), torch.ones(4, device="cuda"))
    except ValueError as e:
        out["bad_device"] = str(e)
    dist.destroy_process_group()
    return out


def test_every_collective_on_cuda_tensors_through_fastspawns_group():
    out, = fastspawn.spawn(collectives_rank, nprocs=1, start_method="zygote")
    assert out["backend"] == "fastspawn"
    assert out["config"] == "cpu:fastspawn,cuda:fastspawn"
    assert out["reused"], out  # torch's NCCL, not a second copy
    assert out["nonblocking"] and out["cpu"] == [1.0] * 3
    assert "same device" in out["bad_device"], out


def streams_rank(i):
    """Stream order, as ProcessGroupNCCL's: the collective sees the caller's earlier
    kernels; wait() orders the caller's later kernels after it; futures are CUDA-aware."""
    fastspawn.init_process_group()
    spin = int(2e8)  # ~0.1 s of GPU time: long enough to lose any race
    side = torch.cuda.Stream()
    x = torch.zeros(1 << 20, device="cuda")
    out = torch.zeros(1 << 20, device="cuda")
    dist.all_reduce(torch.ones(1, device="cuda"))  # the communicator exists
    results = {}
    with torch.cuda.stream(side):
        # a slow kernel, then the data, on the caller's (side) stream: the collective must
        # wait for both
        torch.cuda._sleep(spin)
        x.fill_(2.0)
        work = dist.all_gather_into_tensor(out, x, async_op=True)
        work.wait()  # side waits for the collective; the host does not block
        y = out * 3  # on side, after the collective
    side.synchronize()
    results["sees_caller_kernels"] = out[:4].tolist() == [2.0] * 4
    results["after_wait"] = y[:4].tolist() == [6.0] * 4
    # async_op=False: the current stream waits, the host does not block
    x.fill_(0.0)
    torch.cuda._sleep(spin)
    x.fill_(5.0)
    t0 = time.perf_counter()
    dist.all_gather_into_tensor(out, x)
    returned = time.perf_counter() - t0
    z = out * 1
    torch.cuda.synchronize()
    results["sync_op_order"] = z[:2].tolist() == [5.0, 5.0]
    results["sync_op_host_free"] = returned < 0.05  # returned long before the ~0.1 s spin
    # a CUDA-aware future: its callback runs after the NCCL work
    x.fill_(1.0)
    torch.cuda._sleep(spin)
    x.fill_(4.0)
    fut = dist.all_gather_into_tensor(out, x, async_op=True).get_future()
    doubled = fut.then(lambda f: f.value()[0] * 2)
    results["future"] = doubled.wait()[:2].tolist() == [8.0, 8.0]
    dist.destroy_process_group()
    return results


def test_stream_order_and_cuda_aware_futures():
    results, = fastspawn.spawn(streams_rank, nprocs=1, start_method="zygote")
    assert results == {"sees_caller_kernels": True, "after_wait": True, "sync_op_order": True,
                       "sync_op_host_free": True, "future": True}


def ddp_rank(i, eager):
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    local = int(os.environ["LOCAL_RANK"])
    if eager:  # init_process_group(device_id=...): the communicator comes at once
        fastspawn.init_process_group(device_id=torch.device("cuda", local))
        eager_comms = sorted(_pg()._cuda.communicators)
    else:
        fastspawn.init_process_group()
        eager_comms = sorted(_pg()._cuda.communicators)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    ref = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    ref.load_state_dict(net.state_dict())
    model = DDP(net, device_ids=[local], bucket_cap_mb=0.001)
    x = torch.randn(8, 16, device="cuda")
    for m in (model, ref):
        m(x).pow(2).sum().backward()
    same = all(torch.allclose(p.grad, q.grad)
               for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    comms = sorted(_pg()._cuda.communicators)
    dist.destroy_process_group()
    return eager_comms, comms, same


@pytest.mark.parametrize("eager", [False, True])
def test_ddp_on_the_gpu_with_device_ids(eager):
    (eager_comms, comms, same), = fastspawn.spawn(ddp_rank, args=(eager,), nprocs=1,
                                                  start_method="zygote")
    assert eager_comms == ([0] if eager else []) and comms == [0] and same


def watchdog_rank(i):
    from datetime import timedelta

    # (the timeout is also the communicator's init deadline: not too short for NCCL's init)
    fastspawn.init_process_group(timeout=timedelta(seconds=5))
    t = torch.ones(4, device="cuda")
    dist.all_reduce(t)
    torch.cuda._sleep(int(2e10))  # ~10 s on the caller's stream: the next work cannot end
    work = dist.all_reduce(t, async_op=True)
    try:
        work.synchronize()
        msg = "no error"
    except dist.DistBackendError as e:
        msg = str(e)
    # (no synchronize: the aborted communicator's kernel is still queued behind the sleep;
    # the process exits, as torch's watchdog would end it)
    return msg


def test_watchdog_fails_a_collective_stuck_on_the_gpu():
    msg, = fastspawn.spawn(watchdog_rank, nprocs=1, start_method="zygote")
    assert "NCCL watchdog: all_reduce (seq 2, 4 x float32) did not complete within the " \
           "timeout of 5000 ms" in msg, msg


def mixed_rank(i):
    """fastspawn's group and a ProcessGroupNCCL side by side (what bench/nccl.py does)."""
    fastspawn.init_process_group()
    nccl = dist.new_group(backend="nccl")
    a, b = torch.ones(4, device="cuda"), torch.ones(4, device="cuda")
    dist.all_reduce(a)
    dist.all_reduce(b, group=nccl)
    torch.cuda.synchronize()
    names = (dist.get_backend(), dist.get_backend(nccl))
    dist.destroy_process_group()
    return names, a.tolist() == b.tolist() == [1.0] * 4


def test_fastspawns_group_and_torchs_nccl_side_by_side():
    (names, same), = fastspawn.spawn(mixed_rank, nprocs=1, start_method="zygote")
    assert names == ("fastspawn", "nccl") and same
