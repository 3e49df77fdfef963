"""SIGKILL the launcher or a random rank at random moments of a job's set-up and
collectives: nothing may be left behind (processes, /dev/shm segments,
listening sockets; the autouse check in conftest asserts it after each round)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import PACKAGE_DIR, pid_alive, shm_files, wait_gone

JOB = r"""
import os, sys, time
import torch, torch.distributed as dist
import fastspawn

def rank(i, slow, delay):
    if i == slow:
        time.sleep(delay)  # a slow rank: the others wait in the set-up meanwhile
    fastspawn.init_process_group()  # the fastspawn backend: a shared-memory segment
    t = torch.ones(1 << 16)
    while True:
        dist.all_reduce(t)
        dist.barrier()

if __name__ == "__main__":
    ctx = fastspawn.spawn(rank, args=(int(sys.argv[2]), float(sys.argv[3])),
                          nprocs=int(sys.argv[1]), join=False)
    print(" ".join(map(str, ctx.pids())), flush=True)
    ctx.join()
"""

ROUNDS = int(os.environ.get("FASTSPAWN_STRESS_ROUNDS", "24"))


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_random_sigkill_leaves_nothing(tmp_path, round_):
    rng = random.Random(round_)
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = dict(os.environ, PYTHONPATH=PACKAGE_DIR)
    nprocs = rng.choice([2, 3])
    before_shm = shm_files()
    slow, delay = rng.randrange(nprocs), rng.uniform(0.0, 0.4)
    launcher = subprocess.Popen([sys.executable, str(script), str(nprocs), str(slow), str(delay)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pids = [int(p) for p in launcher.stdout.readline().split()]
    assert len(pids) == nprocs, launcher.communicate(timeout=30)
    # Random moment: during the rendezvous and segment set-up, or in the collectives.
    time.sleep(rng.uniform(0.0, 0.08) if rng.random() < 0.5 else rng.uniform(0.0, 0.6))
    victim = launcher.pid if rng.random() < 0.5 else rng.choice(pids)
    os.kill(victim, signal.SIGKILL)
    try:
        launcher.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.communicate()
        pytest.fail("the launcher did not end after a rank was killed")
    assert wait_gone(pids, 20) == [], "ranks left running"
    assert not any(pid_alive(p) for p in pids)
    assert shm_files() - before_shm == set()
