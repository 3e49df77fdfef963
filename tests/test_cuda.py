"""GPU checks: run where CUDA is present (skipped cleanly elsewhere)."""
import subprocess
import sys

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


def test_init_process_group_uses_nccl_for_cuda_and_sets_the_device():
    (backend, dev, gpu, cpu), = fastspawn.spawn(nccl_rank, nprocs=1, start_method="zygote")
    assert backend == "cpu:gloo,cuda:nccl" and dev == 0
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
