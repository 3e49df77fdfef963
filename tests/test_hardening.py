"""Nothing exposed, nothing leaked, nothing killed by mistake (issue 8's audit)."""
import os
import shutil
import subprocess
import sys
import time

import pytest

import fastspawn
from conftest import PACKAGE_DIR, run_python, socket_inodes, tcp_listeners, unix_listeners

LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def listeners_of(pid: int) -> dict:
    tcp, unix = tcp_listeners(), unix_listeners()
    inodes = socket_inodes(pid)
    return {"tcp": [tcp[i] for i in inodes if i in tcp], "unix": [i for i in inodes if i in unix]}


def look_at_launcher_and_self(i):
    return listeners_of(os.getppid()), listeners_of(os.getpid())


@pytest.mark.parametrize("method", ["fork", "zygote"])
def test_one_machine_job_listens_on_loopback_only(method, no_leaks):
    # Before: torch's TCPStore for env:// listened on *:PORT.
    out = fastspawn.spawn(look_at_launcher_and_self, nprocs=2, start_method=method)
    if method == "fork":  # the parent of a forked rank is the launcher
        launcher, _ = out[0]
        assert launcher["tcp"], "the launcher's store should listen on loopback TCP"
        assert all(addr in LOOPBACK for addr, _ in launcher["tcp"]), launcher["tcp"]


@pytest.mark.parametrize("method", ["fork", "zygote"])
def test_ranks_inherit_no_listener(method, no_leaks):
    # Before: a forked rank held the launcher's TCPStore listener (and its
    # event-loop fds); a rank's long-lived child kept the port bound.
    for _, own in fastspawn.spawn(look_at_launcher_and_self, nprocs=2, start_method=method):
        assert own == {"tcp": [], "unix": []}


def noop(i):
    return None


def test_huge_nprocs_is_refused_before_anything_is_built():
    # Before: a million rank environments (1.5 GB, 2.4 s) were built first.
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="at most 65536"):
        fastspawn.spawn(noop, nprocs=10**6)
    assert time.monotonic() - t0 < 0.5


def test_failed_zygote_start_leaves_no_half_made_job(tmp_path):
    # Before: the right error, then "fastspawn: at exit: the process group was
    # closed" at interpreter exit from a context that never had ranks. (This
    # used to be 300 ranks, refused then; they work now, so the zygote fails
    # here by dying while it imports.)
    (tmp_path / "dies_at_import.py").write_text("import os\nos._exit(3)\n")
    code = """
import fastspawn
def f(i):
    return i
print(fastspawn.spawn(f, nprocs=3, start_method="zygote") == list(range(3)))
"""
    out = run_python(code, cwd=tmp_path, extra_env={"FASTSPAWN_ZYGOTE_PRELOAD": "dies_at_import"})
    assert "at exit" not in out.stderr, out.stderr
    assert out.returncode != 0 and out.stdout.strip() == ""
    # One clear error, nothing after it.
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("fastspawn._zygote.ZygoteError: fastspawn zygote (pid "), out.stderr
    assert "failed while starting" in last and "dies_at_import" in last


def _can_unshare_pid() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs root and unshare --pid")
@pytest.mark.parametrize("mode", ["stop", "guardian"])
def test_reused_pid_of_a_finished_rank_is_not_killed(mode):
    # Before: a rank that finished early was reaped but stayed watched; once its
    # pid was reused by an unrelated process leading its own group, the
    # supervisor's stop (when another rank failed) or the guardian (when the
    # launcher was SIGKILLed) SIGKILLed that process group.
    # Now (see pid_reuse_scenario.py): the job keeps the rank unreaped, so its pid
    # cannot be reused while the job lives (stop); and after the launcher's death,
    # with the pid really reused, the guardian checks the leader's pidfd and
    # leaves the reused group alone, while still killing the live rank's worker.
    script = os.path.join(os.path.dirname(__file__), "pid_reuse_scenario.py")
    env = dict(os.environ, PYTHONPATH=PACKAGE_DIR)
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, script,
                          mode], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "survived", out.stdout + out.stderr
    reuse = "reuse: blocked" if mode == "stop" else "reuse: forced"
    assert any(line.startswith(reuse) for line in lines), out.stdout
