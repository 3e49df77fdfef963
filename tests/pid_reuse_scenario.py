"""Run as pid 1 of a new pid namespace (``unshare --pid --fork --mount-proc``):
a rank that finished early must not make the job kill an unrelated process that
got its pid (and leads a process group of its own, whose id is that pid).

The pid is reused on purpose: writing ``/proc/sys/kernel/ns_last_pid`` (root,
in this namespace only) makes the next fork take the pid after it. The job:
rank 0 returns at once, rank 1 starts a worker in its process group (like a
DataLoader worker) and runs until told to fail.

``stop``: the driver tries to give rank 0's pid to the victim while the job
lives, then rank 1 fails and the supervisor's stop SIGKILLs what is left of
every rank's process group. The fix is that the pid cannot be reused: the
launcher keeps rank 0 unreaped (a zombie) until the job's handle closes, so the
pid and the group id stay the job's. That is the protected outcome: the driver
checks that the pid is still the launcher's zombie (``reuse: blocked``) and
makes the victim with the next pid, which must survive the stop. Without the
fix the victim gets the pid (``reuse: forced``) and the stop kills it.

``guardian``: here the pid really is reused. The guardian is held stopped
(SIGSTOP) while the launcher is SIGKILLed; the driver, as pid 1 now the parent
of the ranks, reaps rank 0 (as init would) and gives its pid to the victim;
then the guardian resumes. It must skip rank 0's group (the leader's pidfd says
it was reaped, so the number is someone else's) and still kill rank 1's worker
(rank 1 is an unreaped zombie: its group is still the job's).

Prints a few lines; the last one is ``survived`` or ``killed``.
"""
import os
import signal
import subprocess
import sys
import time

LAUNCHER = r"""
import os, subprocess, sys
import fastspawn

def rank(i, go_r, worker_w):
    if i == 0:
        return 0  # finishes early
    worker = subprocess.Popen(["sleep", "600"])  # in rank 1's process group
    os.write(worker_w, b"%d\n" % worker.pid)
    os.read(go_r, 1)  # until the driver is ready
    raise RuntimeError("rank 1 fails")

go_r, go_w = os.pipe()
worker_r, worker_w = os.pipe()
ctx = fastspawn.start_processes(rank, (go_r, worker_w), 2, join=False, start_method="fork")
ctx.processes[0].join(60)
assert ctx.processes[0].exitcode == 0
worker = int(os.read(worker_r, 64).split()[0])
print(*ctx.pids(), worker, fastspawn._C.guardian_pid(), flush=True)
sys.stdin.readline()  # the driver has made the victim
os.write(go_w, b"x")
try:
    ctx.join()
except fastspawn.ProcessRaisedException:
    pass
print("joined", flush=True)
"""


def make_victim(pid: int) -> int:
    """Fork a sleeper that gets ``pid`` if it is free (else the next free one) and
    leads its own process group."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
        fh.write(str(pid - 1))
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        time.sleep(600)
        os._exit(0)
    os.setpgid(child, child)  # the group exists before anyone may signal it
    return child


def stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of pid, None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    st = stat(pid)
    return st is not None and st[0] != "Z"


def wait_until(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def stop_mode(launcher: subprocess.Popen, pid0: int, worker: int) -> int:
    victim = make_victim(pid0)
    if victim == pid0:
        print("reuse: forced (the job let rank 0's pid go while it lived)")
    else:
        assert stat(pid0) == ("Z", launcher.pid), stat(pid0)
        print(f"reuse: blocked (pid {pid0} is still the launcher's zombie; victim {victim})")
    launcher.stdin.write("go\n")
    launcher.stdin.flush()
    assert launcher.stdout.readline().strip() == "joined"
    launcher.wait(60)
    assert wait_until(lambda: not alive(worker), 20), "the stop did not kill rank 1's worker"
    return victim


def guardian_mode(launcher: subprocess.Popen, pid0: int, worker: int, guardian: int) -> int:
    os.kill(guardian, signal.SIGSTOP)
    assert wait_until(lambda: (stat(guardian) or ("?",))[0] == "T", 20), stat(guardian)
    launcher.kill()
    launcher.wait(60)
    try:
        os.waitpid(pid0, 0)  # rank 0's zombie is ours now: reap it, as init would
    except ChildProcessError:
        pass  # reaped by the launcher already (before the fix)
    victim = make_victim(pid0)
    if victim != pid0:
        print(f"could not reuse pid {pid0} (got {victim})")
        os.kill(victim, signal.SIGKILL)
        sys.exit(2)
    print(f"reuse: forced (pid {pid0} is the victim's, rank 0 was reaped)")
    os.kill(guardian, signal.SIGCONT)
    assert wait_until(lambda: not alive(worker), 20), "the guardian did not kill rank 1's worker"
    wait_until(lambda: not alive(guardian), 20)  # it is done once it exits
    return victim


def main() -> int:
    mode = sys.argv[1]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    pid0, _pid1, worker, guardian = (int(x) for x in launcher.stdout.readline().split())
    if mode == "stop":
        victim = stop_mode(launcher, pid0, worker)
    else:
        victim = guardian_mode(launcher, pid0, worker, guardian)
    print("survived" if alive(victim) else "killed", flush=True)
    if alive(victim):
        os.kill(victim, signal.SIGKILL)
    os.waitpid(victim, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
