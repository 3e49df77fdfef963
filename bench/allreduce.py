"""all_reduce latency and bandwidth: fastspawn vs gloo, same processes, same run.

    scripts/py bench/allreduce.py [--worlds 2,4] [--out docs/benchmarks.md]

For each world size (default 2 and 4) the ranks are forked once and join two
process groups: "fastspawn" (the default group) and a gloo group. For each
message size (4 B .. 256 MiB, float32) each backend runs `trials` timed loops
of synchronous dist.all_reduce calls; the best loop's mean is reported (the
machine may be shared: the best trial is the least disturbed one). Bandwidth is
the algorithm bandwidth, bytes / time. Single-thread memcpy bandwidth (ctypes
memmove of 64 MiB) is measured in the same run as the physical reference.

With --out, writes its markdown tables as the "allreduce" section of that file
(the results file the other bench/ scripts share) and a PNG plot next to it
(allreduce.png; matplotlib).
"""
import argparse
import ctypes
import multiprocessing
import os
import sys
import tempfile
import time
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)

MIB = 1 << 20


def fmt_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n // size} {unit}"
    return f"{n} B"


def _fs_C():
    from fastspawn import _C

    return _C


def memcpy_bandwidth(nbytes=64 * MIB, reps=5):
    """Best-of-reps single-thread memmove bandwidth in bytes/s."""
    src = (ctypes.c_char * nbytes)()
    dst = (ctypes.c_char * nbytes)()
    ctypes.memset(src, 1, nbytes)
    ctypes.memmove(dst, src, nbytes)  # fault the pages in
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        ctypes.memmove(dst, src, nbytes)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def iterations_for(nbytes, budget):
    """Iterations per timed loop: about `budget` seconds at a pessimistic 0.5 GB/s + 50 us."""
    per = 50e-6 + nbytes / 0.5e9
    return max(2, min(2000, int(budget / per)))


def rank_main(rank, world, path, sizes, trials, budget, queue):
    import torch
    import torch.distributed as dist

    import fastspawn.backend  # noqa: F401 - registers "fastspawn"

    torch.set_num_threads(1)
    store = dist.FileStore(path, world)
    dist.init_process_group("fastspawn", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    groups = {"fastspawn": dist.group.WORLD, "gloo": dist.new_group(backend="gloo")}
    rows = []
    for nbytes in sizes:
        t = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        iters = iterations_for(nbytes, budget)
        row = {"bytes": nbytes, "iters": iters}
        for name, group in groups.items():
            dist.all_reduce(t, group=group)  # warm up (and map pages)
            best = float("inf")
            for _ in range(trials):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                for _ in range(iters):
                    dist.all_reduce(t, group=group)
                elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=groups["gloo"])
                best = min(best, float(elapsed))
            row[name] = best
        rows.append(row)
        if rank == 0:
            print(f"  N={world} {fmt_bytes(nbytes):>8}: fastspawn {row['fastspawn'] * 1e6:10.1f} us"
                  f"  gloo {row['gloo'] * 1e6:10.1f} us  ({row['gloo'] / row['fastspawn']:.1f}x)",
                  flush=True)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(rows)


def run_forked(target, world, *args):
    """Fork `world` ranks running target(rank, world, store_path, *args, queue) and
    return what rank 0 puts on the queue (shared with bench/ddp.py)."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=target, args=(r, world, path) + args + (queue,))
                 for r in range(world)]
        for p in procs:
            p.start()
        result = queue.get(timeout=3600)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        return result


def table_text(results, memcpy_bw, machine):
    lines = [
        "### all_reduce: fastspawn vs gloo (`bench/allreduce.py`)",
        "",
        f"Machine: {machine}. float32 SUM, synchronous `dist.all_reduce`, best of the timed "
        "loops; bandwidth = bytes / time (algorithm bandwidth).",
        f"Single-thread memcpy (64 MiB): **{memcpy_bw / 1e9:.2f} GB/s**.",
        "",
        "![all_reduce latency and bandwidth](allreduce.png)",
        "",
    ]
    for world, rows in results.items():
        lines += [
            f"#### {world} ranks",
            "",
            "| size | fastspawn latency | gloo latency | speed-up | fastspawn GB/s | gloo GB/s "
            "| fastspawn / memcpy |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            fs, gl = r["fastspawn"], r["gloo"]
            lines.append(
                f"| {fmt_bytes(r['bytes'])} | {fs * 1e6:.1f} us | {gl * 1e6:.1f} us | "
                f"{gl / fs:.1f}x | {r['bytes'] / fs / 1e9:.2f} | {r['bytes'] / gl / 1e9:.2f} | "
                f"{r['bytes'] / fs / memcpy_bw:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_plot(path, results, memcpy_bw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.5))
    for world, rows in results.items():
        x = [r["bytes"] for r in rows]
        for name, style in (("fastspawn", "-o"), ("gloo", "--s")):
            ax_lat.plot(x, [r[name] * 1e6 for r in rows], style, label=f"{name}, N={world}")
            ax_bw.plot(x, [r["bytes"] / r[name] / 1e9 for r in rows], style,
                       label=f"{name}, N={world}")
    ax_bw.axhline(memcpy_bw / 1e9, color="gray", linestyle=":", label="memcpy, 1 thread")
    for ax, label in ((ax_lat, "latency (us)"), (ax_bw, "bandwidth (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_lat.set_yscale("log")
    fig.suptitle("all_reduce (float32 SUM): fastspawn vs gloo")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    ap.add_argument("--min-bytes", type=int, default=4)
    ap.add_argument("--max-bytes", type=int, default=256 * MIB)
    ap.add_argument("--trials", type=int, default=3, help="timed loops per size and backend")
    ap.add_argument("--budget", type=float, default=0.15, help="seconds per timed loop (about)")
    ap.add_argument("--out", default=None,
                    help="results file: its 'allreduce' section is (re)written; PNG next to it")
    args = ap.parse_args()

    sizes = []
    n = args.min_bytes
    while n <= args.max_bytes:
        sizes.append(n)
        n *= 4
    memcpy_bw = memcpy_bandwidth()
    print(f"memcpy, 1 thread: {memcpy_bw / 1e9:.2f} GB/s", flush=True)
    results = {}
    for world in (int(w) for w in args.worlds.split(",")):
        results[world] = run_forked(rank_main, world, sizes, args.trials, args.budget)
    memcpy_bw = max(memcpy_bw, memcpy_bandwidth())
    import platform

    import torch

    machine = (f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
               f"reduce kernels: {_fs_C().reduce_isa()}")
    text = table_text(results, memcpy_bw, machine)
    print(text)
    if args.out:
        from spawn import _write_section

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        _write_section(args.out, "allreduce", text)
        png = os.path.join(os.path.dirname(os.path.abspath(args.out)), "allreduce.png")
        write_plot(png, results, memcpy_bw)
        print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
