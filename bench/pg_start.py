"""Spawn -> every rank holds an initialised process group -> barrier -> join.

fastspawn (launcher-hosted store, `fastspawn.init_process_group()`) against
`torch.multiprocessing` + gloo with a hand-picked port (`env://`, the usual
recipe), for N = 2, 4, 8, side by side in one run.

    python bench/pg_start.py [--n 2 4 8] [--repeat 5] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "python"))
import fastspawn  # noqa: E402
from spawn import _write_section  # noqa: E402


def fs_rank(i, backend):
    fastspawn.init_process_group(backend=backend)
    dist.barrier()
    dist.destroy_process_group()


def torch_rank(i, n, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=i, world_size=n)
    dist.barrier()
    dist.destroy_process_group()


def tutorial_rank(i, n, port):
    # The mp.spawn tutorial's own rendezvous, unchanged (works under both launchers).
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=i,
                            world_size=n)
    dist.barrier()
    dist.destroy_process_group()


def hand_picked_port():
    # What scripts do today (and why they clash): ask for a free port, hope.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_it(fn, repeat):
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--slow-repeat", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    backends = ["gloo"] + (["fastspawn"] if "fastspawn" in dist.Backend.backend_list else [])
    cases = [(f"fastspawn (auto) + {b}",
              (lambda b: lambda n: fastspawn.spawn(fs_rank, args=(b,), nprocs=n))(b), False)
             for b in backends]
    cases += [
        ("fastspawn (auto), tutorial's tcp:// + gloo", lambda n: fastspawn.spawn(
            tutorial_rank, args=(n, hand_picked_port()), nprocs=n), False),
        ("torch spawn, tutorial's tcp:// + gloo", lambda n: torch_mp.spawn(
            tutorial_rank, args=(n, hand_picked_port()), nprocs=n), True),
        ("torch fork + gloo", lambda n: torch_mp.start_processes(
            torch_rank, args=(n, hand_picked_port()), nprocs=n, start_method="fork"), False),
        ("torch spawn + gloo", lambda n: torch_mp.spawn(
            torch_rank, args=(n, hand_picked_port()), nprocs=n), True),
    ]
    res = {}
    for label, fn, slow in cases:
        for n in args.n:
            res[(label, n)] = time_it(lambda: fn(n), args.slow_repeat if slow else args.repeat)
            print(f"{label:32s} N={n}: {res[(label, n)] * 1e3:9.1f} ms", flush=True)
    lines = [
        "### Spawn to ready process group to join (`bench/pg_start.py`)",
        "",
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
        f"{torch.__version__}. Each rank: init_process_group, barrier, destroy. Median of "
        f"{args.repeat} runs ({args.slow_repeat} for torch spawn).",
        "",
        "| launcher + backend | " + " | ".join(f"N={n} (ms)" for n in args.n) + " |",
        "|---|" + "---|" * len(args.n),
    ]
    for label, _, _ in cases:
        lines.append(f"| {label} | " + " | ".join(f"{res[(label, n)] * 1e3:.1f}"
                                                  for n in args.n) + " |")
    lines += ["", "| speed-up of fastspawn | " + " | ".join(f"N={n}" for n in args.n) + " |",
              "|---|" + "---|" * len(args.n)]
    pairs = [(label, other) for label, _, _ in cases[:len(backends)]
             for other in ("torch spawn + gloo", "torch fork + gloo")]
    pairs.append(("fastspawn (auto), tutorial's tcp:// + gloo",
                  "torch spawn, tutorial's tcp:// + gloo"))
    for label, other in pairs:
        lines.append(f"| {label} vs {other} | " + " | ".join(
            f"{res[(other, n)] / res[(label, n)]:.1f}x" for n in args.n) + " |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        _write_section(args.out, "pg_start", table)


if __name__ == "__main__":
    main()
