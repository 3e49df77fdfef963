"""The canonical ``mp.spawn`` DDP tutorial, with one line changed: the import.

Every rank does what the tutorial does: ``init_process_group`` with a
``tcp://127.0.0.1:23456`` rendezvous, its own rank and the world size,
``torch.cuda.set_device``, a ``DistributedSampler``, ``DistributedDataParallel``
and an SGD loop. On a machine with GPUs it uses NCCL and one rank per GPU; on
CPUs, gloo and 4 ranks. The data is scikit-learn's built-in digits set.

    python examples/tutorial_spawn.py                 # 4 CPU ranks (or 1 per GPU)
    python examples/tutorial_spawn.py --nprocs 2 --epochs 3

tests/test_tutorial.py runs this file as it is and again with the import put back
to ``torch.multiprocessing``, and checks that both train to the same numbers.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import fastspawn as mp  # the one change; was: import torch.multiprocessing as mp


def load_data():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    split = 1500
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


def main_worker(proc, nprocs, args):
    use_cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                            init_method=f"tcp://127.0.0.1:{args.port}",
                            world_size=nprocs, rank=proc)
    if use_cuda:
        torch.cuda.set_device(proc)
    device = torch.device("cuda", proc) if use_cuda else torch.device("cpu")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    model = DDP(model, device_ids=[proc] if use_cuda else None)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    train_set, test_set = load_data()
    sampler = DistributedSampler(train_set, num_replicas=nprocs, rank=proc, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = torch.zeros(2, device=device)
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            loss = criterion(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += torch.stack([loss.detach() * len(target),
                                  torch.tensor(float(len(target)), device=device)])
        dist.all_reduce(total)
        if proc == 0:
            print(f"epoch {epoch}: loss {total[0].item() / total[1].item():.6f}", flush=True)

    if proc == 0:
        model.eval()
        with torch.no_grad():
            x, y = test_set.tensors
            accuracy = (model(x.to(device)).argmax(1) == y.to(device)).float().mean().item()
        print(f"test accuracy {accuracy:.4f}", flush=True)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=torch.cuda.device_count() or 4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--port", type=int, default=23456)
    args = parser.parse_args()
    mp.spawn(main_worker, nprocs=args.nprocs, args=(args.nprocs, args))


if __name__ == "__main__":
    main()
