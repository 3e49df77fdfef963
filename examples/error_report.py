"""What a failing rank looks like: fastspawn reports the root cause with its
traceback, names every failed rank, and stops the others (nothing is left
running).

    scripts/py examples/error_report.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "python"))
import fastspawn as mp  # noqa: E402


def train(rank, steps):
    for step in range(steps):
        time.sleep(0.01)
        if rank == 2 and step == 5:
            raise FloatingPointError(f"loss became NaN at step {step} on rank {rank}")


if __name__ == "__main__":
    t0 = time.monotonic()
    try:
        mp.spawn(train, args=(1000,), nprocs=4)
    except mp.ProcessRaisedException as err:
        print(f"spawn raised {type(err).__name__} after {time.monotonic() - t0:.2f} s "
              f"(rank {err.error_index}, pid {err.error_pid}):")
        print(err)
