"""Store latency: fastspawn's Store against torch's dist.TCPStore.

Same pattern for both: the server runs in this process (fastspawn: a C thread;
TCPStore: its own server thread), one client connection, each op timed over
many iterations (median of several rounds). Prints a markdown table;
``--out FILE`` also writes it.

    scripts/py bench/store.py [--iters 3000] [--rounds 5] [--out bench/store.md]

Note: TCPStore's set() sends without waiting for an acknowledgement, and its
get() is two round trips (wait, then get); fastspawn's set() waits for the
server's reply, and get() is one round trip that the server answers when the
key exists.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
from fastspawn.store import StoreServer  # noqa: E402


def time_op(fn, iters):
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e6


def ops_for(store):
    store.set("bench/key", b"v" * 32)
    store.set("bench/big", b"x" * (1 << 20))

    def set_get():
        store.set("bench/rt", b"value")
        store.get("bench/rt")

    return [
        ("set + get round trip (32 B)", set_get),
        ("get (32 B, key present)", lambda: store.get("bench/key")),
        ("set (32 B)", lambda: store.set("bench/key", b"v" * 32)),
        ("add", lambda: store.add("bench/ctr", 1)),
        ("check (1 key)", lambda: store.check(["bench/key"])),
        ("wait (1 key, present)", lambda: store.wait(["bench/key"])),
        ("get (1 MiB)", lambda: store.get("bench/big")),
    ]


def run(iters, rounds):
    """Rounds interleave the three clients, so load from elsewhere hits all alike."""
    timeout = timedelta(seconds=30)
    srv = StoreServer(unix_path="@")
    tcp_server = dist.TCPStore("127.0.0.1", 0, 1, True, timeout, wait_for_workers=False)
    clients = {
        "fastspawn": srv.client(timeout),
        "fastspawn (unix socket)": srv.client(timeout, prefer_unix=True),
        "TCPStore": dist.TCPStore("127.0.0.1", tcp_server.port, 1, False, timeout),
    }
    ops = {impl: ops_for(c) for impl, c in clients.items()}
    samples = {}
    for rnd in range(rounds + 1):  # round 0 warms up
        for impl, impl_ops in ops.items():
            for name, fn in impl_ops:
                n = iters if "MiB" not in name else max(iters // 20, 50)
                us = time_op(fn, n if rnd else min(n, 200))
                if rnd:
                    samples.setdefault(name, {}).setdefault(impl, []).append(us)
    for impl in ("fastspawn", "fastspawn (unix socket)"):
        clients[impl].close()
    srv.shutdown()
    del clients, ops, tcp_server
    return {name: {impl: statistics.median(v) for impl, v in r.items()}
            for name, r in samples.items()}


def table(results, iters, rounds):
    lines = [
        f"Store latency, µs per op (median of {rounds} rounds of {iters} ops; "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()})",
        "",
        "| op | fastspawn TCP | fastspawn unix | TCPStore | TCP / TCPStore |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        ours, unix, theirs = r["fastspawn"], r["fastspawn (unix socket)"], r["TCPStore"]
        lines.append(f"| {name} | {ours:.1f} | {unix:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    lines += [
        "",
        "TCPStore's set() does not wait for the server (fire and forget); fastspawn's does. "
        "TCPStore's get() is two round trips (wait + get); fastspawn's is one.",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="also write the markdown table to this file")
    a = ap.parse_args()
    text = table(run(a.iters, a.rounds), a.iters, a.rounds)
    print(text)
    if a.out:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from spawn import _write_section

        _write_section(a.out, "store", "### Store latency (`bench/store.py`)\n\n" + text + "\n")


if __name__ == "__main__":
    main()
