"""CUDA all_reduce and NCCL start-up: fastspawn's group against torch's
ProcessGroupNCCL, side by side, on one GPU.

1. allreduce: float32 all_reduce of 4 KiB .. 256 MiB at world size 1, fastspawn's
   group and a ProcessGroupNCCL (dist.new_group(backend="nccl")) in the same
   process, async_op=False as a training loop calls it. Per call: the host time
   (enqueue; what differs at world size 1) and the time to completion. The cases
   alternate in every round (ABBA), each cell is the median over the rounds with
   the spread (min..max).
2. start: spawn -> an NCCL communicator ready -> one all_reduce -> join, one rank:
   fastspawn.spawn (default start method) + fastspawn.init_process_group() against
   torch.multiprocessing.spawn + init_process_group("nccl"), alternating.

    python bench/nccl.py [--phase all|allreduce|start] [--rounds 5] [--start-rounds 3]
                         [--max-size 256M] [--deadline 150] [--out DIR] [--rehearse]

Every wait is bounded: device waits poll a CUDA event against the phase's deadline,
ranks are joined with timeouts and terminated past them (what was measured until
then is reported). Tables go to stdout and, with --out (default $OUT), to
DIR/bench_nccl.md (+ .json), ready for docs/benchmarks.md.

--rehearse: the same harness on a machine without a GPU (fastspawn's group on the
fake CUDA runtime + NCCL of tests/c/bin/fake, `make fakes`; gloo as the peer). It
checks the script end to end; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (also in torch.multiprocessing's spawned ranks, which re-import this file without argv)
REHEARSE = "--rehearse" in sys.argv or os.environ.get("FASTSPAWN_BENCH_REHEARSE") == "1"
if REHEARSE:  # before fastspawn is imported: the test-only switch is read at import
    _fake = os.path.join(ROOT, "tests", "c", "bin", "fake")
    os.environ.update(FASTSPAWN_BENCH_REHEARSE="1", FASTSPAWN_TEST_NCCL_ON_CPU="1",
                      FAKE_CUDA_DEVICES="1",
                      FASTSPAWN_NCCL_LIBRARY=os.path.join(_fake, "libnccl.so.2"),
                      FASTSPAWN_CUDART_LIBRARY=os.path.join(_fake, "libcudart.so.13"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as torch_mp  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "python"))
import fastspawn  # noqa: E402

T0 = time.monotonic()
PEER = "gloo" if REHEARSE else "nccl"
CASES = ("fastspawn", PEER)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def size_label(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def parse_size(text: str) -> int:
    text = text.upper().rstrip("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def device_wait(deadline: float) -> None:
    """Wait for the current stream's work, polling against a deadline (never forever)."""
    if REHEARSE:
        return
    ev = torch.cuda.Event()
    ev.record()
    while not ev.query():
        if time.monotonic() > deadline:
            raise TimeoutError("the GPU did not finish the benchmark's work before the deadline")


# ---------------------------------------------------------------------------
# 1. all_reduce per call, both groups in one process
# ---------------------------------------------------------------------------

def iterations(nbytes: int) -> int:
    return max(5, min(1000, (64 << 20) // nbytes))


def allreduce_rank(i, sizes, rounds, deadline):
    fastspawn.init_process_group()
    peer = dist.new_group(backend=PEER)
    groups = {"fastspawn": dist.group.WORLD, PEER: peer}
    device = torch.device("cpu") if REHEARSE else torch.device("cuda", torch.cuda.current_device())
    gpu = "fake (rehearsal)" if REHEARSE else torch.cuda.get_device_name(device)
    bufs = {n: torch.ones(n // 4, device=device) for n in sizes}
    for n in sizes:  # warm-up: communicators, algorithms, allocator
        for case in CASES:
            for _ in range(3):
                dist.all_reduce(bufs[n], group=groups[case])
    device_wait(deadline)
    samples = {f"{case} {kind} {n}": [] for case in CASES for kind in ("host", "done")
               for n in sizes}
    done_rounds = 0
    for r in range(rounds):
        for n in sizes:
            order = CASES if (r + sizes.index(n)) % 2 == 0 else CASES[::-1]
            for case in order:
                if time.monotonic() > deadline:
                    return {"gpu": gpu, "rounds": done_rounds, "samples": samples,
                            "cut": True}
                t, g, iters = bufs[n], groups[case], iterations(n)
                device_wait(deadline)
                t0 = time.perf_counter()
                for _ in range(iters):
                    dist.all_reduce(t, group=g)
                t1 = time.perf_counter()
                device_wait(deadline)
                t2 = time.perf_counter()
                samples[f"{case} host {n}"].append((t1 - t0) / iters)
                samples[f"{case} done {n}"].append((t2 - t0) / iters)
        done_rounds += 1
    dist.destroy_process_group()
    return {"gpu": gpu, "rounds": done_rounds, "samples": samples, "cut": False}


def join_bounded(ctx, deadline: float, what: str) -> bool:
    """Join a fastspawn or torch spawn context by the deadline; terminate it past that."""
    while time.monotonic() < deadline:
        if ctx.join(timeout=min(1.0, max(0.05, deadline - time.monotonic()))):
            return True
    log(f"{what}: past the deadline, terminating")
    if hasattr(ctx, "terminate"):
        ctx.terminate()
    else:
        for p in ctx.processes:
            p.kill()
        for p in ctx.processes:
            p.join(5)
    return False


def phase_allreduce(args, deadline: float) -> dict:
    sizes, n = [], 4 << 10
    while n <= parse_size(args.max_size):
        sizes.append(n)
        n *= 4
    log(f"allreduce: {len(sizes)} sizes {size_label(sizes[0])} .. {size_label(sizes[-1])}, "
        f"{args.rounds} rounds, fastspawn vs {PEER}")
    ctx = fastspawn.spawn(allreduce_rank, args=(sizes, args.rounds, deadline - 5), nprocs=1,
                          join=False)
    if not join_bounded(ctx, deadline, "allreduce"):
        raise TimeoutError("the all_reduce rank did not finish by the deadline")
    res = ctx.results()[0]
    res["sizes"] = sizes
    if res["cut"]:
        log(f"allreduce: deadline reached after {res['rounds']} full rounds (partial data)")
    return res


def median_spread(xs, scale=1e6, digits=1):
    if not xs:
        return "-", None
    m = statistics.median(xs)
    lo, hi = min(xs) * scale, max(xs) * scale
    return f"{m * scale:.{digits}f} ({lo:.{digits}f}..{hi:.{digits}f})", m


def allreduce_table(res: dict) -> str:
    lines = [f"all_reduce float32, world size 1, {res['gpu']}: microseconds per call, "
             f"median ({'min..max'}) over {res['rounds']} rounds, async_op=False",
             "", f"| size | fastspawn host | {PEER} host | fastspawn done | {PEER} done "
             f"| done ratio |", "|---|---|---|---|---|---|"]
    s = res["samples"]
    for n in res["sizes"]:
        cells, meds = [], {}
        for kind in ("host", "done"):
            for case in CASES:
                text, meds[(case, kind)] = median_spread(s[f"{case} {kind} {n}"])
                cells.append(text)
        a, b = meds[("fastspawn", "done")], meds[(PEER, "done")]
        ratio = f"{a / b:.2f}" if a and b else "-"
        lines.append(f"| {size_label(n)} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# 2. spawn -> NCCL group ready -> one all_reduce -> join
# ---------------------------------------------------------------------------

def _first_all_reduce(deadline: float) -> None:
    device = "cpu" if REHEARSE else "cuda"
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    device_wait(deadline)
    assert t.item() == 1.0


def fs_start_rank(i, path, deadline):
    enter = time.time()
    fastspawn.init_process_group()
    _first_all_reduce(deadline)
    ready = time.time()
    dist.destroy_process_group()
    with open(path, "w") as fh:
        json.dump({"enter": enter, "ready": ready}, fh)


def torch_start_rank(i, path, port, deadline):
    enter = time.time()
    if not REHEARSE:
        torch.cuda.set_device(0)
    dist.init_process_group(PEER, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    _first_all_reduce(deadline)
    ready = time.time()
    dist.destroy_process_group()
    with open(path, "w") as fh:
        json.dump({"enter": enter, "ready": ready}, fh)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(case: str, deadline: float, tmp: str) -> dict:
    path = os.path.join(tmp, f"{case}-{time.monotonic_ns()}.json")
    t0 = time.time()
    if case == "fastspawn":
        ctx = fastspawn.spawn(fs_start_rank, args=(path, deadline), nprocs=1, join=False)
    else:
        ctx = torch_mp.spawn(torch_start_rank, args=(path, free_port(), deadline), nprocs=1,
                             join=False)
    ok = join_bounded(ctx, deadline, f"start {case}")
    t1 = time.time()
    if not ok or not os.path.exists(path):
        raise TimeoutError(f"start {case}: the rank did not finish by the deadline")
    with open(path) as fh:
        r = json.load(fh)
    return {"total": t1 - t0, "to_rank": r["enter"] - t0, "rank_ready": r["ready"] - r["enter"],
            "exit": t1 - r["ready"]}


def phase_start(args, deadline: float) -> dict:
    log(f"start: {args.start_rounds} rounds, fastspawn.spawn vs torch.multiprocessing.spawn "
        f"(+ {PEER})")
    runs = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.start_rounds):
            for case in (CASES if r % 2 == 0 else CASES[::-1]):
                if time.monotonic() > deadline - 2:
                    log("start: deadline reached (partial data)")
                    return runs
                runs[case].append(start_once(case, deadline, tmp))
                log(f"start: round {r + 1} {case}: {runs[case][-1]['total']:.3f} s")
    return runs


def start_table(runs: dict, gpu: str) -> str:
    method = fastspawn.DEFAULT_START_METHOD
    labels = {"fastspawn": f"fastspawn.spawn ({method}) + fastspawn.init_process_group()",
              PEER: f"torch.multiprocessing.spawn + init_process_group(\"{PEER}\")"}
    lines = [f"spawn -> {'NCCL' if not REHEARSE else PEER} group ready -> one all_reduce -> "
             f"join, 1 rank, {gpu}: seconds, median (min..max)", "",
             "| case | total | to rank code | init + first all_reduce | exit + join |",
             "|---|---|---|---|---|"]
    for case in CASES:
        rs = runs.get(case) or []
        cells = [median_spread([r[k] for r in rs], 1.0, 3)[0]
                 for k in ("total", "to_rank", "rank_ready", "exit")]
        lines.append(f"| {labels[case]} | " + " | ".join(cells) + " |")
    a = [r["total"] for r in runs.get("fastspawn") or []]
    b = [r["total"] for r in runs.get(PEER) or []]
    if a and b:
        ratio = statistics.median(b) / statistics.median(a)
        lines += ["", f"fastspawn reaches a ready group and joins {ratio:.1f}x as fast as "
                  "torch.multiprocessing.spawn."]
    return "\n".join(lines)


def gpu_name() -> str:
    if REHEARSE:
        return "no GPU (rehearsal: fake CUDA runtime + NCCL, gloo as the peer)"
    try:  # nvidia-smi, not torch: the launcher must not initialise CUDA (it forks ranks)
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        return out.stdout.strip().splitlines()[0] or "unknown GPU"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown GPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["all", "allreduce", "start"], default="all")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--start-rounds", type=int, default=3)
    ap.add_argument("--max-size", default="4M" if REHEARSE else "256M")
    ap.add_argument("--deadline", type=float, default=150.0,
                    help="seconds for each phase, after which it stops and reports")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--rehearse", action="store_true")
    args = ap.parse_args()
    if not REHEARSE and torch.cuda.device_count() == 0:  # NVML: CUDA stays uninitialised
        log("no GPU here: nothing to measure (--rehearse runs the harness on the fakes)")
        return 0
    gpu = gpu_name()
    log(f"GPU: {gpu}; torch {torch.__version__}; fastspawn {fastspawn.__version__}")
    tables, raw, failed = [], {"gpu": gpu, "torch": torch.__version__}, []
    if args.phase in ("all", "allreduce"):
        try:
            res = phase_allreduce(args, time.monotonic() + args.deadline)
            raw["allreduce"] = res
            tables.append(allreduce_table(res))
            gpu = res["gpu"] if not REHEARSE else gpu
        except Exception as e:  # noqa: BLE001 - report, go on with the next phase
            log(f"allreduce phase FAILED: {type(e).__name__}: {e}")
            failed.append("allreduce")
    if args.phase in ("all", "start"):
        try:
            runs = phase_start(args, time.monotonic() + args.deadline)
            raw["start"] = runs
            tables.append(start_table(runs, gpu))
        except Exception as e:  # noqa: BLE001
            log(f"start phase FAILED: {type(e).__name__}: {e}")
            failed.append("start")
    text = "\n\n".join(tables)
    print("\n" + text + "\n", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_nccl.md"), "w") as fh:
            fh.write(text + "\n")
        with open(os.path.join(args.out, "bench_nccl.json"), "w") as fh:
            json.dump(raw, fh, indent=1)
        log(f"tables written to {os.path.join(args.out, 'bench_nccl.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
