"""The launcher-hosted store, one-call process groups, env://, several nodes."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import fastspawn
from conftest import FAST_METHODS, PACKAGE_DIR
from fastspawn._rendezvous import detect_placement, first_slurm_host, job_token


def allreduce_rank(i):
    fastspawn.init_process_group()
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    out = (t.item(), dist.get_rank(), dist.get_world_size(), dist.get_backend())
    dist.destroy_process_group()
    return out


def env_init_rank(i):
    # A script written for torch: rendezvous through MASTER_ADDR/MASTER_PORT.
    dist.init_process_group("gloo", init_method="env://")
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item(), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]


def crash_before_rendezvous(i):
    if i == 1:
        raise RuntimeError("rank 1 died before init_process_group")
    fastspawn.init_process_group()  # waits for rank 1, which never comes
    dist.barrier()


def outside_rank_init(i):
    del os.environ["FASTSPAWN_STORE_ADDR"]
    fastspawn.init_process_group()


@pytest.mark.parametrize("method", FAST_METHODS)
def test_init_process_group_needs_no_arguments(method, no_leaks):
    out = fastspawn.spawn(allreduce_rank, nprocs=3, start_method=method)
    assert [o[0] for o in out] == [6.0, 6.0, 6.0]
    assert [o[1] for o in out] == [0, 1, 2] and {o[2] for o in out} == {3}
    assert {o[3] for o in out} == {fastspawn.default_backend()}


@pytest.mark.parametrize("method", FAST_METHODS)
def test_env_init_method_works_unchanged(method, no_leaks):
    out = fastspawn.spawn(env_init_rank, nprocs=2, start_method=method)
    assert [o[0] for o in out] == [2.0, 2.0]
    assert out[0][1] == "127.0.0.1" and int(out[0][2]) > 0


@pytest.mark.skipif(os.environ.get("FASTSPAWN_TEST_SANITIZED") == "1",
                    reason="3 launchers at once, 3 jobs each, under load: GCC 12's libasan "
                           "allocator is not fork-safe (a rank can deadlock in malloc); see "
                           "scripts/sanitize_pytest.sh")
def test_two_jobs_at_once_never_clash():
    code = """
import fastspawn, torch, torch.distributed as dist
def rank(i):
    dist.init_process_group("gloo", init_method="env://")
    t = torch.ones(1); dist.all_reduce(t); dist.destroy_process_group()
    return t.item()
for _ in range(3):
    assert fastspawn.spawn(rank, nprocs=2) == [2.0, 2.0]
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=PACKAGE_DIR)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    try:
        for p in procs:
            results.append(p.communicate(timeout=120) + (p.returncode,))
    finally:
        for p in procs:  # every launcher is waited for, also when one failed
            if p.poll() is None:
                p.kill()
                p.communicate()
    for out, err, rc in results:
        # gloo of some torch versions prints its own lines to stdout
        assert rc == 0 and out.strip().splitlines()[-1] == "ok", err


def test_rank_crash_mid_rendezvous_is_reported_not_hung(no_leaks):
    t0 = time.monotonic()
    with pytest.raises(fastspawn.ProcessRaisedException, match="died before init"):
        fastspawn.spawn(crash_before_rendezvous, nprocs=3, start_method="fork")
    assert time.monotonic() - t0 < 20


def test_init_process_group_outside_a_rank():
    with pytest.raises(fastspawn.ProcessRaisedException, match="needs a rank started by"):
        fastspawn.spawn(outside_rank_init, nprocs=1, start_method="fork")


def test_store_is_gone_after_join():
    ctx = fastspawn.spawn(allreduce_rank, nprocs=1, join=False, start_method="fork")
    addr = ctx.store_addr
    assert addr.startswith("unix:@")  # one machine: the abstract Unix socket
    tcp = (ctx._rendezvous.store_host, ctx._rendezvous.store_port)
    assert ctx.join(timeout=60)
    assert ctx.store_addr is None
    with pytest.raises(OSError):
        socket.create_connection(tcp, timeout=2).close()
    with pytest.raises(OSError):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect("\0" + addr[len("unix:@"):])


# ----------------------------------------------------------------- placement


def test_placement_single_node_by_default():
    p = detect_placement(env={})
    assert (p.nnodes, p.node_rank, p.master_port, p.multi_node) == (1, 0, 0, False)


def test_placement_from_slurm():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "MASTER_PORT": "29500"}
    p = detect_placement(env=env)
    assert (p.nnodes, p.node_rank, p.master_addr, p.master_port, p.source) == (
        2, 1, "gpu07", 29500, "SLURM")
    with pytest.raises(ValueError, match="ntasks-per-node=1"):
        detect_placement(env=dict(env, SLURM_NTASKS="8"))


def test_placement_from_mpi_pmi_torchrun_and_arguments():
    base = {"MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    p = detect_placement(env=dict(base, OMPI_COMM_WORLD_SIZE="3", OMPI_COMM_WORLD_RANK="2"))
    assert (p.nnodes, p.node_rank, p.source) == (3, 2, "OpenMPI")
    p = detect_placement(env=dict(base, PMI_SIZE="2", PMI_RANK="1"))
    assert (p.nnodes, p.node_rank, p.source) == (2, 1, "PMI")
    p = detect_placement(env=dict(base, GROUP_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                                  TORCHELASTIC_RUN_ID="x"))
    assert (p.nnodes, p.node_rank, p.master_port, p.source) == (2, 1, 1235, "torchrun")
    p = detect_placement(4, 3, "h", 99, env={"SLURM_PROCID": "0", "SLURM_NNODES": "1"})
    assert (p.nnodes, p.node_rank, p.master_addr, p.master_port) == (4, 3, "h", 99)


def test_placement_inside_a_rank_is_local():
    env = {"FASTSPAWN_IN_RANK": "1", "SLURM_PROCID": "1", "SLURM_NNODES": "2",
           "SLURM_NODEID": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "5"}
    p = detect_placement(env=env)
    assert (p.nnodes, p.node_rank, p.master_port) == (1, 0, 0)


@pytest.mark.parametrize("kw,match", [
    ({"nnodes": 2, "node_rank": 2, "master_addr": "a", "master_port": 1}, "out of range"),
    ({"nnodes": 0}, "at least 1"),
    ({"nnodes": 2, "node_rank": 0, "master_port": 1}, "needs master_addr"),
    ({"nnodes": 2, "node_rank": 0, "master_addr": "a"}, "needs master_port"),
    ({"master_port": 70000}, "0..65535")])
def test_placement_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        detect_placement(env={}, **kw)


def test_slurm_nodelist_and_token():
    assert first_slurm_host("node[03-05,07],cpu1") == "node03"
    assert first_slurm_host("single") == "single"
    p = detect_placement(2, 0, "a", 1, env={})
    os.environ.pop("FASTSPAWN_JOB_TOKEN", None)
    with pytest.raises(ValueError, match="FASTSPAWN_JOB_TOKEN"):
        job_token(p, None)
    assert job_token(p, "s3cret") == "s3cret"
    assert len(job_token(detect_placement(env={}), None)) == 32


def test_bad_rendezvous_arguments_start_nothing(no_leaks):
    with pytest.raises(ValueError, match="out of range"):
        fastspawn.spawn(allreduce_rank, nprocs=1, nnodes=2, node_rank=5, master_addr="x",
                        master_port=1, store_token="t")


# ----------------------------------------------------------------- several nodes

NODE = r"""
import os, sys, torch, torch.distributed as dist, fastspawn
def store_listens_on():
    # Local addresses (hex, as /proc/net/tcp has them) listening on MASTER_PORT.
    port = "%04X" % int(os.environ["MASTER_PORT"])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[1].endswith(":" + port):
                out.append(f[1].rsplit(":", 1)[0])
    return sorted(out)
def rank(i):
    fastspawn.init_process_group(backend="gloo")
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    out = (dist.get_rank(), dist.get_world_size(), t.item(), store_listens_on())
    dist.destroy_process_group()
    return out
node_rank, nprocs, port, token = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    print(fastspawn.spawn(rank, nprocs=nprocs, nnodes=int(sys.argv[6]), node_rank=node_rank,
                          master_addr="127.0.0.1", master_port=port, store_token=token,
                          rdzv_timeout=float(sys.argv[5])))
except Exception as e:
    print(type(e).__name__ + ": " + str(e))
    sys.exit(3)
"""


def _free_port():
    with socket.socket() as s:  # test-only: the launcher itself never guesses ports
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(specs, timeout=20.0, nnodes=2, pause=0.2, extra_env=None):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=PACKAGE_DIR, **(extra_env or {}))
    procs = []
    for node_rank, nprocs, token in specs:
        procs.append(subprocess.Popen(
            [sys.executable, "-c", NODE, str(node_rank), str(nprocs), str(port), token,
             str(timeout), str(nnodes)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
        time.sleep(pause)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append((p.returncode, out, err))
    return results


def test_two_launchers_as_two_nodes():
    results = _nodes([(0, 2, "tok"), (1, 2, "tok")])
    for rc, out, err in results:
        assert rc == 0, out + err
    node0, node1 = (eval(r[1].strip().splitlines()[-1]) for r in results)
    assert [r[0] for r in node0] == [0, 1] and [r[0] for r in node1] == [2, 3]
    assert {r[1] for r in node0 + node1} == {4}
    assert {r[2] for r in node0 + node1} == {6.0}  # 0 + 1 + 2 + 3
    # Node 0's store listens on every interface (the other nodes must reach it).
    assert node0[0][3] == ["00000000"]


def test_store_bind_restricts_the_multi_node_store():
    results = _nodes([(0, 1, "tok"), (1, 1, "tok")],
                     extra_env={"FASTSPAWN_STORE_BIND": "127.0.0.1"})
    for rc, out, err in results:
        assert rc == 0, out + err
    node0 = eval(results[0][1].strip().splitlines()[-1])
    assert node0[0][3] == ["0100007F"]  # 127.0.0.1 only


def test_nodes_with_different_nprocs_are_refused():
    results = _nodes([(0, 2, "tok"), (1, 1, "tok")])
    for rc, out, err in results:
        assert rc == 3, out + err
        assert "same number of ranks" in out and "node 1: 1" in out


def test_wrong_token_is_refused():
    results = _nodes([(0, 1, "right"), (1, 1, "wrong")], timeout=5.0)
    assert results[1][0] == 3
    assert "PermissionError" in results[1][1] or "token" in results[1][1].lower()


def test_duplicate_node_rank_is_refused():
    # Node 2 never comes, so node 0 and the first node 1 wait (then time out,
    # naming node 2) while the second node 1 tries to register.
    results = _nodes([(0, 1, "tok"), (1, 1, "tok"), (1, 1, "tok")], timeout=8.0, nnodes=3,
                     pause=1.5)
    assert results[2][0] == 3 and "registered twice" in results[2][1]
    assert results[0][0] == 3 and "nodes [2] did not check in" in results[0][1]


def test_unreachable_store_fails_within_the_timeout():
    t0 = time.monotonic()
    results = _nodes([(1, 1, "tok")], timeout=2.0)
    assert results[0][0] == 3
    assert "cannot reach node 0" in results[0][1]
    assert time.monotonic() - t0 < 30


def ddp_rank(i, steps):
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    fastspawn.init_process_group()
    model = DDP(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own data
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=g)).pow(2).sum().backward()
        opt.step()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    dist.destroy_process_group()
    return dist.is_available(), params


@pytest.mark.parametrize("method", FAST_METHODS)
def test_ddp_through_spawn_keeps_replicas_identical(method):
    out = fastspawn.spawn(ddp_rank, args=(5,), nprocs=2, start_method=method)
    a, b = out[0][1], out[1][1]
    assert torch.equal(a, b)  # bit-identical replicas after 5 steps on different data
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    init = torch.cat([p.detach().flatten() for p in fresh.parameters()])
    assert a.shape == init.shape and not torch.equal(a, init)  # training moved them
