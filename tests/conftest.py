"""Shared fixtures for the fastspawn suite."""
import os
import platform
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The package under test: the in-tree one, or another build of it (the
# sanitizer run points this at an ASan/UBSan build).
PACKAGE_DIR = os.environ.get("FASTSPAWN_TEST_PACKAGE_DIR", os.path.join(ROOT, "python"))
sys.path.insert(0, PACKAGE_DIR)

import fastspawn  # noqa: E402

# Methods that start in milliseconds; spawn/forkserver import torch per rank
# (seconds on 2 cores) and are covered by fewer tests.
FAST_METHODS = ["fork", "zygote"]
ALL_METHODS = ["fork", "zygote", pytest.param("spawn", marks=pytest.mark.slow),
               pytest.param("forkserver", marks=pytest.mark.slow)]


def _noop(i):
    return None


@pytest.fixture(scope="session", autouse=True)
def _warm_helpers():
    """Start the long-lived helpers (guardian, zygote) once, so the leak checks
    below see only what a test itself leaves behind."""
    fastspawn.spawn(_noop, nprocs=1, start_method="fork")  # starts the guardian
    fastspawn.start_zygote()
    fastspawn.spawn(_noop, nprocs=1, start_method="zygote")
    yield


def children_of(pid: int) -> list:
    """Direct children of pid (from /proc)."""
    out = []
    task_dir = f"/proc/{pid}/task"
    try:
        tasks = os.listdir(task_dir)
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"{task_dir}/{tid}/children") as fh:
                out += [int(x) for x in fh.read().split()]
        except FileNotFoundError:
            pass
    return out


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids, timeout=10.0) -> list:
    """Wait until none of pids is alive; return those still alive."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if pid_alive(p)]
    return left


# poll(2) and ppoll(2), where the C store client waits, by machine (the
# numbers are per architecture); elsewhere the kernel's wait channel says "poll".
_POLL_SYSCALLS = {"x86_64": {"7", "271"}, "aarch64": {"73"}}


def _in_poll(native_id: int) -> bool:
    task = f"/proc/self/task/{native_id}"
    numbers = _POLL_SYSCALLS.get(platform.machine())
    try:
        if numbers is not None:
            with open(f"{task}/syscall") as fh:
                return fh.read().split(" ", 1)[0] in numbers
        with open(f"{task}/wchan") as fh:
            return "poll" in fh.read()
    except FileNotFoundError:
        return False


def wait_until_in_poll(native_id: int, timeout: float = 10.0) -> None:
    """Wait until the thread ``native_id`` of this process sleeps in poll(2), as a
    blocking store call does once it has sent its request (and released the GIL)."""
    deadline = time.monotonic() + timeout
    while not _in_poll(native_id):
        assert time.monotonic() < deadline, f"thread {native_id} never blocked in poll"
        time.sleep(0.005)


def socket_inodes(pid: int) -> set:
    """Inodes of the sockets process pid holds."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[len("socket:["):-1])
    return out


def tcp_listeners() -> dict:
    """inode -> (hex local address, port) of every listening TCP socket here."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                addr, port = fields[1].rsplit(":", 1)
                out[fields[9]] = (addr, int(port, 16))
    return out


def unix_listeners() -> set:
    """Inodes of listening Unix sockets (flag __SO_ACCEPTCON)."""
    out = set()
    for line in open("/proc/net/unix").read().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & 0x10000:
            out.add(fields[6])
    return out


def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def run_python(code: str, timeout: float = 120, extra_env=None,
               **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_DIR, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def shm_files() -> set:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("fastspawn")}
    except FileNotFoundError:
        return set()


def _listening_sockets() -> set:
    tcp, unix = tcp_listeners(), unix_listeners()
    return {i for i in socket_inodes(os.getpid()) if i in tcp or i in unix}


def _helpers():
    """(pids, fds) of the long-lived helpers a test may start: the guardian, the
    zygote, multiprocessing's forkserver and resource tracker."""
    from multiprocessing import forkserver, resource_tracker
    pids, fds = set(), set()
    z = fastspawn._zygote._zygote
    if z is not None:
        pids.add(z.proc.pid)
        fds.add(str(z.conn.fileno()))  # a test may restart the zygote on purpose
        fds.add(str(z.pidfd))  # the guardian's registration of it
    pids.add(fastspawn._C.guardian_pid())
    pids.add(getattr(forkserver._forkserver, "_forkserver_pid", None))
    pids.add(getattr(resource_tracker._resource_tracker, "_pid", None))
    for fd in (getattr(resource_tracker._resource_tracker, "_fd", None),
               getattr(forkserver._forkserver, "_forkserver_alive_fd", None)):
        if fd is not None:
            fds.add(str(fd))
    return pids - {None, 0}, fds


def _reap_orphan_zombies() -> None:
    # This process is a subreaper: orphans that exited become its zombies.
    for pid in children_of(os.getpid()):
        if not pid_alive(pid):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


@pytest.fixture(autouse=True)
def _leave_nothing_behind(request):
    """Every test: no process (orphaned grandchildren included: this process is
    a subreaper), no listening socket and no /dev/shm segment left behind;
    tests that ask for ``no_leaks`` also leave no fd."""
    shm_before, listening_before = shm_files(), _listening_sockets()
    fds_before = open_fds()
    yield
    helper_pids, helper_fds = _helpers()
    left = [p for p in wait_gone([p for p in children_of(os.getpid())
                                  if p not in helper_pids], 10)]
    _reap_orphan_zombies()
    shm_left = shm_files() - shm_before
    for name in shm_left:  # fail this test, not every later one
        os.unlink(os.path.join("/dev/shm", name))
    listening = _listening_sockets() - listening_before
    leaked = open_fds() - fds_before - helper_fds
    assert left == [], f"processes left behind: {left}"
    assert not shm_left, f"/dev/shm segments left behind: {sorted(shm_left)}"
    assert not listening, f"listening sockets left open: {listening}"
    if "no_leaks" in request.fixturenames:
        assert not leaked, f"fds left open: {[_fd_target(fd) for fd in leaked]}"


def _fd_target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd} (closed since)"


@pytest.fixture
def no_leaks():
    """Also check that the test leaves no fd open (see _leave_nothing_behind)."""
    yield


def _become_subreaper() -> None:
    import ctypes
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def pytest_configure(config):
    _become_subreaper()
    config.addinivalue_line("markers", "slow: takes many seconds (skipped under the sanitizers)")
