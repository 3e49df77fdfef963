"""Run as pid 1 of a new pid namespace (``unshare --pid --fork --mount-proc``):
a rank that finished early has its pid reused by an unrelated process, which
leads a process group of its own; then the job ends badly, by the supervisor's
stop (``stop``: another rank fails) or by the guardian (``guardian``: the
launcher is SIGKILLed). The unrelated process must survive. Prints one line:
``survived`` or ``killed``.

The pid is reused on purpose: writing ``/proc/sys/kernel/ns_last_pid`` (root,
in this namespace only) makes the next fork take the pid after it.
"""
import os
import signal
import subprocess
import sys
import time

LAUNCHER = r"""
import os, sys
import fastspawn

def rank(i, go_r):
    if i == 0:
        return 0  # finishes early; its pid becomes free once reaped
    os.read(go_r, 1)  # until the driver has reused rank 0's pid
    raise RuntimeError("rank 1 fails")

go_r, go_w = os.pipe()
ctx = fastspawn.start_processes(rank, (go_r,), 2, join=False, start_method="fork")
ctx.processes[0].join(60)  # reaped by the supervisor
assert ctx.processes[0].exitcode == 0
print(ctx.pids()[0], ctx.pids()[1], flush=True)
sys.stdin.readline()  # the driver has made the victim
os.write(go_w, b"x")
try:
    ctx.join()
except fastspawn.ProcessRaisedException:
    pass
print("joined", flush=True)
"""


def make_victim(pid: int) -> int:
    """Fork a sleeper that gets ``pid`` and leads its own process group."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
        fh.write(str(pid - 1))
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        time.sleep(600)
        os._exit(0)
    os.setpgid(child, child)  # the group exists before anyone may signal it
    return child


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def main() -> int:
    mode = sys.argv[1]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    pid0, pid1 = (int(x) for x in launcher.stdout.readline().split())
    victim = make_victim(pid0)
    if victim != pid0:
        print(f"could not reuse pid {pid0} (got {victim})")
        os.kill(victim, signal.SIGKILL)
        launcher.kill()
        return 2
    if mode == "stop":
        launcher.stdin.write("go\n")
        launcher.stdin.flush()
        assert launcher.stdout.readline().strip() == "joined"
        launcher.wait(60)
    else:
        launcher.kill()
        launcher.wait(60)
        deadline = time.monotonic() + 20
        while alive(pid1) and time.monotonic() < deadline:  # the guardian's work
            time.sleep(0.02)
        assert not alive(pid1), "the guardian did not stop rank 1"
    print("survived" if alive(victim) else "killed", flush=True)
    os.kill(victim, signal.SIGKILL)
    os.waitpid(victim, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
