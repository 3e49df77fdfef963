"""The main job: DDP training of a small MLP on scikit-learn's bundled digits
data set, on N ranks started by fastspawn, then the same run on torch's own
backend for comparison (gloo on CPUs, NCCL on GPUs).

On a machine with GPUs each rank trains on its own GPU (LOCAL_RANK, one rank per
GPU by default) through fastspawn's group, whose CUDA tensors go to NCCL; elsewhere
on CPU ranks over shared memory. The same group serves both devices.

    scripts/py examples/train_ddp.py [--nprocs N] [--epochs 8] [--device auto|cpu|cuda]
                                     [--backend auto|fastspawn|gloo|nccl] [--no-compare]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "python"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

import fastspawn  # noqa: E402


def load_digits():
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    split = int(0.8 * len(x))
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def init_group(rank: int, world: int, backend: str, rendezvous: str) -> str:
    """One call where fastspawn provides it; a file rendezvous (no port to pick) otherwise."""
    if hasattr(fastspawn, "init_process_group"):
        fastspawn.init_process_group(backend=None if backend == "auto" else backend)
    else:
        dist.init_process_group("gloo" if backend == "auto" else backend,
                                init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    return dist.get_backend()


def train(rank: int, world: int, epochs: int, backend: str, rendezvous: str, quiet: bool,
          data, use_cuda: bool = False):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    used = init_group(rank, world, backend, rendezvous)
    # fastspawn.init_process_group made LOCAL_RANK's GPU the current device
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    train_set, test_set = data
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10)).to(device)
    model = DDP(net, device_ids=[device.index] if use_cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    progress = None
    if rank == 0 and not quiet:
        from tqdm import tqdm

        progress = tqdm(total=epochs * len(loader), desc=f"train [{used}]", unit="step",
                        file=sys.stdout, leave=False)
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = torch.zeros(2, device=device)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach() * len(x), torch.tensor(float(len(x)),
                                                                       device=device)])
            if progress is not None:
                progress.update()
        dist.all_reduce(total)
        model.eval()
        with torch.no_grad():
            xs, ys = (t.to(device) for t in test_set.tensors)
            acc = (model(xs).argmax(1) == ys).float().mean().item()
        history.append((epoch, (total[0] / total[1]).item(), acc))
        if rank == 0 and not quiet:
            msg = f"epoch {epoch + 1}/{epochs}  loss {history[-1][1]:.4f}  test accuracy {acc:.3f}"
            (progress.write if progress else print)(msg)
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    dist.destroy_process_group()
    return {"backend": used, "seconds": elapsed, "history": history,
            "checksum": float(params.double().sum())}


def run(args, backend: str, quiet: bool, use_cuda: bool):
    rendezvous = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                              f"fastspawn-ddp-{os.getpid()}-{backend}-{time.monotonic_ns()}")
    data = load_digits()  # once, in the launcher: the ranks inherit it
    import torch._dynamo  # noqa: F401 - DDP imports it (~1 s); once here, not in every rank
    if not quiet:
        how = "fork" if not fastspawn.fork_safety_issues() else "zygote"
        print(f"start method: auto ({how}); backend: {backend}")
    t0 = time.perf_counter()
    results = fastspawn.spawn(train, args=(args.nprocs, args.epochs, backend, rendezvous, quiet,
                                           data, use_cuda), nprocs=args.nprocs)
    wall = time.perf_counter() - t0
    checksums = {r["checksum"] for r in results}
    assert len(checksums) == 1, f"DDP replicas diverged: {checksums}"
    return results[0], wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nprocs", type=int, default=None,
                    help="ranks (default: one per GPU with --device cuda, else 2)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: the GPUs when there are any")
    ap.add_argument("--backend", default="auto",
                    help="auto (fastspawn's default), fastspawn, gloo, nccl")
    ap.add_argument("--no-compare", action="store_true",
                    help="skip the comparison run on torch's own backend")
    args = ap.parse_args()
    # device_count() asks NVML and leaves CUDA alone (is_available() may initialise the
    # driver, after which a forked rank could not use CUDA): the launcher stays fork-safe
    gpus = torch.cuda.device_count()
    use_cuda = args.device == "cuda" or (args.device == "auto" and gpus > 0)
    if use_cuda and gpus == 0:
        sys.exit("--device cuda: this machine has no usable GPU")
    if args.nprocs is None:
        args.nprocs = gpus if use_cuda else 2
    where = f"{args.nprocs} GPU rank(s)" if use_cuda else f"{args.nprocs} CPU ranks"
    print(f"DDP on {where} started by fastspawn, digits data set (sklearn)")
    main_result, main_wall = run(args, args.backend, quiet=False, use_cuda=use_cuda)
    h = main_result["history"][-1]
    print(f"final: loss {h[1]:.4f}, test accuracy {h[2]:.3f}; replicas identical")
    rows = [(main_result["backend"], main_result["seconds"], main_wall)]
    peer = "nccl" if use_cuda else "gloo"
    if not args.no_compare and main_result["backend"] != peer:
        peer_result, peer_wall = run(args, peer, quiet=True, use_cuda=use_cuda)
        rows.append((peer, peer_result["seconds"], peer_wall))
    print("\n| backend | training (s) | spawn to join (s) |\n|---|---|---|")
    for name, train_s, wall in rows:
        print(f"| {name} | {train_s:.2f} | {wall:.2f} |")
    if len(rows) > 1:
        print(f"\n{rows[0][0]} trains {rows[1][1] / rows[0][1]:.2f}x as fast as {rows[1][0]} "
              "here.")
    if h[2] < 0.9:
        sys.exit(f"test accuracy {h[2]:.3f} is below 0.9: training did not work")


if __name__ == "__main__":
    main()
