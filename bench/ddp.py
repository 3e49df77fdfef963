"""DDP training steps/s on a communication-bound MLP: fastspawn vs gloo, same run.

    scripts/py bench/ddp.py [--batches 1,2,4,8] [--out docs/benchmarks.md]

The ranks are forked once and join two process groups, "fastspawn" (default) and
gloo. The model is an MLP of about 25M float32 parameters (100 MB of gradients
per step) trained with small batches, so the gradient all_reduce is a large part
of a step; larger batches show how the gain shrinks as compute grows. Each
backend trains the same model with plain DistributedDataParallel; the backends
alternate for `trials` rounds and the best round's steps/s is reported, next to
the same training without DDP (no communication: the bound for any backend). The
final parameters of both backends are compared (they should be equal).
With --out, writes its table as the "ddp" section of that results file.
"""
import argparse
import os
import sys
import time
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)


def make_model(width, depth):
    import torch.nn as nn

    layers, d_in = [], width // 4
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, width // 4))
    return nn.Sequential(*layers)


def rank_main(rank, world, path, args, queue):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastspawn.backend  # noqa: F401 - registers "fastspawn"

    torch.set_num_threads(args.threads)
    store = dist.FileStore(path, world)
    dist.init_process_group("fastspawn", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    groups = {"fastspawn": dist.group.WORLD, "gloo": dist.new_group(backend="gloo")}
    rows = []
    for batch in args.batches:
        models, opts = {}, {}
        for name, group in groups.items():
            torch.manual_seed(0)
            model = make_model(args.width, args.depth)
            models[name] = DDP(model, process_group=group, bucket_cap_mb=args.bucket_mb,
                               gradient_as_bucket_view=bool(args.bucket_view))
            opts[name] = torch.optim.SGD(models[name].parameters(), lr=1e-3)
        torch.manual_seed(0)
        models["local"] = make_model(args.width, args.depth)  # no DDP: the compute-only bound
        opts["local"] = torch.optim.SGD(models["local"].parameters(), lr=1e-3)
        n_params = sum(p.numel() for p in models["gloo"].parameters())
        g = torch.Generator().manual_seed(rank)
        data = [(torch.randn(batch, args.width // 4, generator=g),
                 torch.randn(batch, args.width // 4, generator=g)) for _ in range(4)]

        def steps(name, count):
            model, opt = models[name], opts[name]
            for i in range(count):
                x, y = data[i % len(data)]
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()

        best = {name: 0.0 for name in models}
        for name in models:
            steps(name, args.warmup)
        for _ in range(args.trials):
            for name in models:
                dist.barrier(group=groups["gloo"])
                t0 = time.perf_counter()
                steps(name, args.steps)
                elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=groups["gloo"])
                best[name] = max(best[name], args.steps / float(elapsed))
        same = all(torch.equal(a, b) for a, b in zip(models["fastspawn"].parameters(),
                                                      models["gloo"].parameters()))
        rows.append({"batch": batch, "params": n_params, "best": best, "same": same})
        if rank == 0:
            fs, gl = best["fastspawn"], best["gloo"]
            print(f"  batch {batch}: fastspawn {fs:6.2f} steps/s, gloo {gl:6.2f} steps/s "
                  f"({fs / gl:.2f}x), no communication {best['local']:6.2f} steps/s, "
                  f"same parameters: {same}", flush=True)
        del models, opts
    dist.destroy_process_group()
    if rank == 0:
        queue.put(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--width", type=int, default=4096, help="hidden width (input = width / 4)")
    ap.add_argument("--depth", type=int, default=2, help="hidden layers")
    ap.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--bucket-view", type=int, default=0, help="gradient_as_bucket_view (0/1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default=None, help="results file: its 'ddp' section is (re)written")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]

    from allreduce import run_forked

    rows = run_forked(rank_main, args.world, args)
    lines = [
        "### DDP steps/s: fastspawn vs gloo (`bench/ddp.py`)",
        "",
        f"MLP of {rows[0]['params'] / 1e6:.1f}M float32 parameters ({args.depth} hidden "
        f"layers of {args.width}), {args.world} ranks, {args.threads} torch thread(s) per "
        f"rank, DDP bucket_cap_mb={args.bucket_mb}, gradient_as_bucket_view="
        f"{bool(args.bucket_view)}, SGD; best of {args.trials} rounds of {args.steps} steps.",
        "",
        "| batch | fastspawn steps/s | gloo steps/s | speed-up | no communication "
        "(bound) | same parameters |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        fs, gl = r["best"]["fastspawn"], r["best"]["gloo"]
        lines.append(f"| {r['batch']} | {fs:.2f} | {gl:.2f} | {fs / gl:.2f}x | "
                     f"{r['best']['local']:.2f} | {r['same']} |")
    text = "\n".join(lines + [""])
    print(text)
    if args.out:
        from spawn import _write_section

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        _write_section(args.out, "ddp", text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
