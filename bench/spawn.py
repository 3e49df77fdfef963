"""Start-up benchmark: fastspawn vs torch.multiprocessing, side by side.

For N = 1, 2, 4, 8 ranks and each start method it measures
  ready: from the spawn call until every rank is running fn with torch imported
  total: the whole spawn + join
Each rank writes the time it entered fn (CLOCK_MONOTONIC is system-wide on
Linux) to a file; the same rank function serves both libraries.

    python bench/spawn.py [--n 1 2 4 8] [--repeat 3] [--out docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as torch_mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "python"))
import fastspawn  # noqa: E402


def rank_fn(i, outdir):
    import torch  # noqa: F401 - part of what "ready" means

    t = time.monotonic()
    with open(os.path.join(outdir, str(i)), "w") as fh:
        fh.write(repr(t))


def run_once(launch, n):
    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        launch(n, d)
        total = time.monotonic() - t0
        starts = []
        for i in range(n):
            with open(os.path.join(d, str(i))) as fh:
                starts.append(float(fh.read()))
    return max(starts) - t0, total


def fs_launch(method):
    return lambda n, d: fastspawn.spawn(rank_fn, args=(d,), nprocs=n, start_method=method)


def torch_launch(method):
    return lambda n, d: torch_mp.start_processes(rank_fn, args=(d,), nprocs=n,
                                                 start_method=method)


def fs_zygote_cold(n, d):
    z = fastspawn._zygote._zygote
    if z is not None:
        z.close()
    fastspawn._zygote._zygote = None
    fastspawn.spawn(rank_fn, args=(d,), nprocs=n, start_method="zygote")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeat", type=int, default=5, help="runs of each fast method (median)")
    ap.add_argument("--slow-repeat", type=int, default=1,
                    help="runs of the methods that import torch in every rank")
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args()

    multiprocessing.set_forkserver_preload(["torch"])  # torch's forkserver at its best
    cases = [
        # (label, launcher, slow?, torch counterpart label)
        ("fastspawn default (auto)", fs_launch("auto"), False),
        ("fastspawn fork", fs_launch("fork"), False),
        ("fastspawn zygote, warm", fs_launch("zygote"), False),
        ("fastspawn zygote, first call", fs_zygote_cold, True),
        ("fastspawn spawn", fs_launch("spawn"), True),
        ("fastspawn forkserver (torch preloaded), warm", fs_launch("forkserver"), False),
        ("torch fork", torch_launch("fork"), False),
        ("torch forkserver (torch preloaded), warm", torch_launch("forkserver"), False),
        ("torch spawn", torch_launch("spawn"), True),
    ]
    fastspawn.spawn(rank_fn, args=(tempfile.gettempdir(),), nprocs=1, start_method="zygote")
    torch_launch("forkserver")(1, tempfile.mkdtemp())  # start torch's forkserver once
    # Rounds interleave the cases (fastspawn, torch, fastspawn, ...), so a noisy
    # moment on the machine hits both sides rather than one.
    runs = {(label, n): [] for label, _, _ in cases for n in args.n}
    for n in args.n:
        for rnd in range(max(args.repeat, args.slow_repeat)):
            for label, launch, slow in cases:
                if rnd < (args.slow_repeat if slow else args.repeat):
                    runs[(label, n)].append(run_once(launch, n))
    results = {}
    for (label, n), rs in runs.items():
        results[(label, n)] = (statistics.median(r[0] for r in rs),
                               statistics.median(r[1] for r in rs))
        print(f"{label:42s} N={n}: ready {results[(label, n)][0] * 1e3:8.1f} ms  "
              f"total {results[(label, n)][1] * 1e3:8.1f} ms", flush=True)

    lines = [
        f"### Start-up: fastspawn vs torch.multiprocessing (`bench/spawn.py`)",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}. Median of {args.repeat} runs, "
        f"the cases interleaved ({args.slow_repeat} for methods that import torch in each "
        "rank). "
        "*ready*: spawn call until every rank runs fn with torch imported; *total*: spawn + join.",
        "",
        "| method | " + " | ".join(f"N={n} ready / total (ms)" for n in args.n) + " |",
        "|---|" + "---|" * len(args.n),
    ]
    for label, _, _ in cases:
        cells = [f"{results[(label, n)][0] * 1e3:.1f} / {results[(label, n)][1] * 1e3:.1f}"
                 for n in args.n]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios (ready time, higher = fastspawn faster):", "",
              "| comparison | " + " | ".join(f"N={n}" for n in args.n) + " |",
              "|---|" + "---|" * len(args.n)]
    for ours, theirs in [("fastspawn default (auto)", "torch spawn"),
                         ("fastspawn default (auto)", "torch fork"),
                         ("fastspawn zygote, warm", "torch forkserver (torch preloaded), warm"),
                         ("fastspawn zygote, warm", "torch spawn"),
                         ("fastspawn spawn", "torch spawn"),
                         ("fastspawn forkserver (torch preloaded), warm",
                          "torch forkserver (torch preloaded), warm")]:
        cells = [f"{results[(theirs, n)][0] / results[(ours, n)][0]:.1f}x" for n in args.n]
        lines.append(f"| {ours} vs {theirs} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.out:
        _write_section(args.out, "spawn", table)


def _write_section(path, name, text):
    """Replace (or append) the section between markers in a shared results file."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    try:
        with open(path) as fh:
            doc = fh.read()
    except FileNotFoundError:
        doc = "# Benchmarks\n\nGenerated by the scripts in `bench/`; rerun them to refresh.\n\n"
    block = f"{begin}\n{text}{end}\n"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end) + 1:]
    else:
        doc += "\n" + block
    with open(path, "w") as fh:
        fh.write(doc)


if __name__ == "__main__":
    main()
