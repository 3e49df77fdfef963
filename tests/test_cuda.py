"""GPU checks: run where CUDA is present (skipped cleanly elsewhere)."""
import pytest
import torch
import torch.distributed as dist

import fastspawn

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
    assert "nccl" in backend and dev == 0
    assert gpu == [1.0] * 4 and cpu == [1.0] * 4


def test_nccl_rendezvous_through_fastspawn_store():
    assert fastspawn.spawn(plain_nccl_rank, nprocs=1, start_method="zygote") == [[1.0, 1.0]]


def test_parent_with_cuda_uses_the_zygote_and_refuses_fork():
    torch.zeros(1, device="cuda")  # initialise CUDA in the launcher
    assert torch.cuda.is_initialized()
    assert fastspawn._launch._resolve_start_method("auto") == "zygote"
    with pytest.raises(RuntimeError, match="CUDA is initialised"):
        fastspawn.spawn(nccl_rank, nprocs=1, start_method="fork")
    out = fastspawn.spawn(nccl_rank, nprocs=1)  # auto
    assert out[0][2] == [1.0] * 4
