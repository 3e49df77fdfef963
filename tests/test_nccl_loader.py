"""The CUDA/NCCL layer as Python sees it (fastspawn._C): loading NCCL and the
CUDA runtime at run time, the ABI of our own declarations against the real
headers, and _C.NcclComm against the fake libraries of tests/c/fake_cuda/.

Loading is process-wide, so each scenario runs in a fresh interpreter.
Nothing here needs a GPU: the real libnccl.so.2 and libcudart.so.13 come
from PyPI wheels (requirements-dev.txt); where they are missing the tests
that need them skip and say why.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import PACKAGE_DIR, ROOT

FAKE_DIR = os.path.join(ROOT, "tests", "c", "bin", "fake")
ABI_DIR = os.path.join(ROOT, "tests", "c", "abi")


def nvidia_dirs(*parts):
    """Existing site-packages/nvidia/<parts> directories (the wheels' layout torch uses)."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    return [d for base in nvidia.__path__ if os.path.isdir(d := os.path.join(base, *parts))]


def wheel_nccl_lib():
    dirs = [d for d in nvidia_dirs("nccl", "lib") if os.path.exists(f"{d}/libnccl.so.2")]
    if not dirs:
        pytest.skip("libnccl.so.2 of the nvidia-nccl-cu13 wheel is not installed")
    return dirs[0]


def wheel_cudart_lib():
    for d in nvidia_dirs("cu13", "lib") + nvidia_dirs("cuda_runtime", "lib"):
        if glob.glob(f"{d}/libcudart.so.*"):
            return d
    return None


def python_env(**extra):
    """The environment of a fresh interpreter: the package under test, no loader variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTSPAWN_NCCL_LIBRARY", "FASTSPAWN_CUDART_LIBRARY")}
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_DIR, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


_torch_libs = None


def torch_cuda_libs():
    """The libnccl / libcudart files `import torch` maps by itself (a CUDA build of
    torch loads both; the CPU build neither)."""
    global _torch_libs
    if _torch_libs is None:
        _torch_libs = fresh("""
            import torch
            for line in open("/proc/self/maps"):
                if "libnccl" in line or "libcudart" in line:
                    print(line.split()[-1])
        """).split()
    return set(_torch_libs)


def skip_if_torch_loaded(name):
    if any(name in p for p in torch_cuda_libs()):
        pytest.skip(f"this torch loads its own {name} at import: the search never gets past it")


def fresh(code, **env):
    """Run code in a fresh interpreter (loading is process-wide); its stdout."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120, env=python_env(**env))
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

CUDA_LIBS_MAPPED = """
def cuda_libs():
    return {line.split()[-1] for line in open("/proc/self/maps")
            if "libnccl" in line or "libcudart" in line}
"""


def test_importing_fastspawn_loads_no_cuda_library():
    # (a CUDA build of torch maps both itself: fastspawn must add nothing)
    out = fresh(CUDA_LIBS_MAPPED + """
import torch
before = cuda_libs()
import fastspawn, fastspawn._C as C
print(sorted(cuda_libs() - before), C.nccl_version(), C.nccl_library_path())
    """)
    assert out.split() == ["[]", "0", "None"]


def test_real_nccl_from_the_wheel_through_a_passed_dir_reports_its_version_and_caps():
    lib = wheel_nccl_lib()
    header = os.path.join(os.path.dirname(lib), "include", "nccl.h")
    want = int(re.search(r"#define NCCL_VERSION_CODE (\d+)", open(header).read()).group(1))
    skip_if_torch_loaded("libnccl")  # (then it would report torch's copy)
    out = fresh(CUDA_LIBS_MAPPED + f"""
import fastspawn._C as C
before = cuda_libs()
print(C.nccl_load([{lib!r}]), C.nccl_caps(), C.nccl_library_path())
# NCCL links the runtime statically: no libcudart comes with it
print(any("libcudart" in p for p in cuda_libs() - before))
    """)
    version, caps, path, cudart = out.split()
    assert int(version) == want  # 23007 for the pinned nvidia-nccl-cu13==2.30.7
    import fastspawn._C as C
    every = (C.NCCL_CAP_ABORT | C.NCCL_CAP_ASYNC_ERROR | C.NCCL_CAP_NONBLOCKING
             | C.NCCL_CAP_FINALIZE | C.NCCL_CAP_SPLIT | C.NCCL_CAP_PREMUL_SUM | C.NCCL_CAP_AVG
             | C.NCCL_CAP_BFLOAT16 | C.NCCL_CAP_FLOAT8 | C.NCCL_CAP_LAST_ERROR)
    assert int(caps) == every  # a 2.30 NCCL has every optional symbol
    assert os.path.samefile(path, os.path.join(lib, "libnccl.so.2"))
    assert cudart == "False"


def test_a_failed_search_names_the_variable_and_every_place_with_dlerror():
    skip_if_torch_loaded("libnccl")
    out = fresh("""
        import fastspawn._C as C
        for load in (C.nccl_load, C.cuda_load):
            try:
                load(["/nonexistent/one", "/nonexistent/two"])
                print("LOADED", C.cuda_library_path())
            except RuntimeError as e:
                print(repr(str(e)))
    """)
    nccl, cuda = out.splitlines()
    assert "set FASTSPAWN_NCCL_LIBRARY to its path" in nccl
    for place in ("FASTSPAWN_NCCL_LIBRARY: not set",
                  "already loaded in this process: no libnccl.so.2",
                  "/nonexistent/one/libnccl.so.2: cannot open shared object file",
                  "/nonexistent/two/libnccl.so.2: cannot open shared object file",
                  'system (dlopen "libnccl.so.2"): libnccl.so.2: cannot open'):
        assert place in nccl, place
    # The CUDA runtime: every soname in every dir; a machine may have a system copy.
    if not cuda.startswith("LOADED"):
        assert "set FASTSPAWN_CUDART_LIBRARY" in cuda
        assert "/nonexistent/two/libcudart.so.11.0" in cuda


def test_the_forced_path_is_the_only_place_tried():
    lib = wheel_nccl_lib()
    out = fresh(f"""
        import fastspawn._C as C
        try:
            C.nccl_load([{lib!r}])
        except RuntimeError as e:
            print(repr(str(e)))
    """, FASTSPAWN_NCCL_LIBRARY="/nonexistent/libnccl.so.2")
    assert "FASTSPAWN_NCCL_LIBRARY=/nonexistent/libnccl.so.2 (forced" in out
    assert lib not in out
    forced = os.path.join(lib, "libnccl.so.2")
    out = fresh("import fastspawn._C as C; print(C.nccl_load(), C.nccl_library_path())",
                FASTSPAWN_NCCL_LIBRARY=forced)
    assert os.path.samefile(out.split()[1], forced)


def test_a_copy_already_loaded_comes_first():
    lib = wheel_nccl_lib()
    skip_if_torch_loaded("libnccl")  # (torch's own copy would come first)
    out = fresh(f"""
        import ctypes, fastspawn._C as C
        ctypes.CDLL({lib!r} + "/libnccl.so.2")  # as torch would have loaded it
        C.nccl_load(["/nonexistent/one"])
        print(C.nccl_library_path())
        print("/nonexistent/one" in C.nccl_search_report())
    """)
    path, tried_dir = out.split()
    assert os.path.samefile(path, os.path.join(lib, "libnccl.so.2")) and tried_dir == "False"


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="this machine has a GPU driver")
def test_a_cuda_collective_without_a_gpu_is_a_clean_error():
    lib = wheel_nccl_lib()
    cudart = wheel_cudart_lib()
    out = fresh(f"""
        import fastspawn._C as C
        C.nccl_load([{lib!r}])
        def comm():
            try:
                C.NcclComm(bytes(C.NCCL_UNIQUE_ID_BYTES), 0, 1, 0)
                print("CREATED")
            except RuntimeError as e:
                print(repr(str(e)))
        comm()  # the runtime not loaded yet
        try:
            C.cuda_load([{cudart!r}] if {cudart!r} else [])
            print("cudart", C.cuda_library_path())
        except RuntimeError as e:
            print("nocudart", repr(str(e)))
        comm()
    """)
    before, loaded, after = out.splitlines()
    assert "the CUDA runtime is not loaded" in before
    if loaded.startswith("nocudart"):
        assert "FASTSPAWN_CUDART_LIBRARY" in loaded and "not loaded" in after
    else:  # the wheel's (or a system) libcudart, but no driver or device here
        assert "no usable CUDA device: cudaGetDeviceCount failed" in after
        assert re.search(r"cudaError(InsufficientDriver|NoDevice)", after), after


# ---------------------------------------------------------------------------
# ABI: our declarations against the real headers
# ---------------------------------------------------------------------------

def compile_check(source, includes):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    cmd = [cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-Werror=incompatible-pointer-types",
           "-fsyntax-only"] + [f"-I{d}" for d in includes] + [
           f"-I{ROOT}/csrc/lib", os.path.join(ABI_DIR, source)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, " ".join(cmd) + "\n" + out.stderr


def header_dirs(name, candidates):
    return [d for d in candidates if os.path.exists(os.path.join(d, name))]


def cuda_homes():
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + sorted(
        glob.glob("/usr/local/cuda*"), reverse=True)
    return [os.path.join(h, "include") for h in homes if h]


def test_our_nccl_declarations_match_the_real_nccl_h():
    found = header_dirs("nccl.h", nvidia_dirs("nccl", "include") + cuda_homes() + ["/usr/include"])
    if not found:
        pytest.skip("no nccl.h: install nvidia-nccl-cu13 (requirements-dev.txt) or NCCL's headers")
    # The stub answers nccl.h's #include <cuda_runtime.h> with the two handle types it needs.
    compile_check("check_nccl_abi.c", [os.path.join(ABI_DIR, "cuda_stub"), found[0]])


def test_our_cuda_declarations_match_the_real_cuda_runtime_api_h():
    found = [d for d in header_dirs("cuda_runtime_api.h", nvidia_dirs("cu13", "include")
                                    + nvidia_dirs("cuda_runtime", "include") + cuda_homes())
             if os.path.exists(os.path.join(d, "crt", "host_defines.h"))]
    if not found:
        pytest.skip("no cuda_runtime_api.h (with crt/): install nvidia-cuda-runtime and "
                    "nvidia-cuda-crt (requirements-dev.txt) or a CUDA toolkit")
    compile_check("check_cuda_abi.c", [found[0]])


# ---------------------------------------------------------------------------
# _C.NcclComm against the fakes, two forked ranks
# ---------------------------------------------------------------------------

RANKS = r"""
import ctypes, os, sys, traceback
import torch
import fastspawn._C as C

FAKE = sys.argv[1]
C.cuda_load([FAKE])  # (the test forces these paths: a CUDA torch has loaded the real ones)
C.nccl_load([FAKE])
log = ctypes.CDLL(os.path.join(FAKE, "libcudart.so.13"))  # the loaded copy: same handle

def log_text():
    n = log.fakecuda_log_read(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    log.fakecuda_log_read(buf, n + 1)
    return buf.value.decode()

def rank_main(rank, world, uid):
    comm = C.NcclComm(uid, rank, world, rank, timeout=20)
    assert (comm.rank, comm.world_size, comm.device, comm.nonblocking) == (rank, world, rank, True)
    # all_reduce on the caller's stream 0, with the order of calls the log shows
    t = torch.full((4,), float(rank + 1))
    log.fakecuda_log_clear()
    w = comm.run(C.COLL_ALLREDUCE, C.DTYPE_FLOAT32, 4, t.data_ptr(), t.data_ptr(), op=C.OP_SUM)
    w.synchronize(10)
    assert w.query() and w.seq == 1 and t.tolist() == [3.0] * 4, t
    calls = []  # (call, its stream, its event) in order
    for line in log_text().splitlines():
        if line.startswith(("cudaEventRecord", "cudaStreamWaitEvent", "ncclAllReduce")):
            tok = dict(t.split("=", 1) for t in line.split()[1:])
            calls.append((line.split()[0], int(tok["stream"], 16), tok.get("event")))
    s = comm.stream
    ready = calls[0][2]  # recorded on the caller's stream, waited for by the comm stream
    assert calls == [("cudaEventRecord", 0, ready), ("cudaStreamWaitEvent", s, ready),
                     ("ncclAllReduce", s, None), ("cudaEventRecord", s, calls[3][2])], calls
    assert calls[3][2] != ready  # the work's own end event
    # sync (async_op=False): positional arguments, and the caller's stream waits for the end
    # event in the same call, which returns no work
    log.fakecuda_log_clear()
    assert comm.run(C.COLL_ALLREDUCE, C.DTYPE_FLOAT32, 4, t.data_ptr(), t.data_ptr(), C.OP_MAX,
                    0, 0, True) is None
    waits = [line for line in log_text().splitlines() if line.startswith("cudaStreamWaitEvent")]
    records = [line for line in log_text().splitlines() if line.startswith("cudaEventRecord")]
    assert len(waits) == 2 and "stream=0x0 " in waits[1] + " ", waits
    assert waits[1].split("event=")[1] == records[1].split()[1].split("=")[1], (waits, records)
    # it ran after the work before it on the comm stream: a later barrier finds it done
    comm.run(C.COLL_BARRIER, 0, 0).synchronize(10)
    assert t.tolist() == [3.0] * 4, t
    # a group of two calls is one work
    a, b = torch.ones(2), torch.full((3,), float(rank))
    comm.group_start()
    assert comm.run(C.COLL_ALLREDUCE, C.DTYPE_FLOAT32, 2, a.data_ptr(), a.data_ptr()) is None
    comm.run(C.COLL_BROADCAST, C.DTYPE_FLOAT32, 3, 0, b.data_ptr(), root=1)
    g = comm.group_end()
    g.synchronize(10)
    assert g.seq == 4 and a.tolist() == [2.0, 2.0] and b.tolist() == [1.0] * 3
    # uneven all_to_all: rank r sends r + p + 1 elements to p
    sc = [rank + p + 1 for p in range(world)]
    rc = [p + rank + 1 for p in range(world)]
    sd = [sum(sc[:p]) for p in range(world)]
    rd = [sum(rc[:p]) for p in range(world)]
    src = torch.arange(sum(sc), dtype=torch.int64) + 100 * rank
    dst = torch.zeros(sum(rc), dtype=torch.int64)
    comm.run(C.NCCL_ALLTOALLV, C.DTYPE_INT64, 0, src.data_ptr(), dst.data_ptr(),
             send_counts=sc, send_displs=sd, recv_counts=rc, recv_displs=rd).synchronize(10)
    want = []
    for p in range(world):
        off = sum(p + q + 1 for q in range(rank))
        want += [100 * p + off + i for i in range(rc[p])]
    assert dst.tolist() == want, (dst.tolist(), want)
    comm.run(C.COLL_BARRIER, 0, 0).synchronize(10)
    # refusals: ValueError, and the communicator stays usable
    for bad in (dict(op=C.OP_BXOR), dict(root=world)):
        try:
            comm.run(C.COLL_REDUCE, C.DTYPE_INT32, 1, t.data_ptr(), t.data_ptr(), **bad)
            raise AssertionError("not refused: %r" % bad)
        except ValueError:
            pass
    try:
        comm.run(C.NCCL_ALLTOALLV, C.DTYPE_INT64, 0, 1, 1, send_counts=[1])
        raise AssertionError("short counts not refused")
    except ValueError as e:
        assert "one per rank" in str(e)
    assert comm.status() is None
    comm.close(5)
    assert comm.closed

def rank_timeout(rank, world, uid):
    # the watchdog: a collective that never completes fails, naming it, its seq and the timeout
    comm = C.NcclComm(uid, rank, world, rank, timeout=0.3, watchdog_interval=0.02)
    t = torch.ones(2)
    w = comm.run(C.COLL_ALLREDUCE, C.DTYPE_FLOAT32, 2, t.data_ptr(), t.data_ptr())
    try:
        w.synchronize()
        raise AssertionError("no timeout")
    except TimeoutError as e:
        msg = str(e)
    assert "all_reduce (seq 1, 2 x float32) did not complete within the timeout of 300 ms" in msg
    assert comm.status()[0] == "FS_ETIMEOUT"
    try:
        comm.run(C.COLL_BARRIER, 0, 0)
        raise AssertionError("usable after the watchdog aborted it")
    except TimeoutError as e:
        assert str(e) == msg
    comm.close()

def spawn(world, fn):
    # Fork first, then take the id: no fake NCCL thread runs in the parent while it forks.
    pipes, pids = [], []
    for rank in range(world):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            code = 1
            try:
                fn(rank, world, os.read(r, C.NCCL_UNIQUE_ID_BYTES))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(code)
        os.close(r)
        pipes.append(w)
        pids.append(pid)
    uid = C.nccl_get_unique_id()
    for w in pipes:
        os.write(w, uid)
        os.close(w)
    return [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]

print(spawn(2, rank_main))
os.environ["FAKE_NCCL_STUCK"] = "AllReduce"
os.environ["FAKE_NCCL_NO_PEER_CHECK"] = "1"
print(spawn(2, rank_timeout))
"""


def fake_libs():
    libs = [os.path.join(FAKE_DIR, n) for n in ("libcudart.so.13", "libnccl.so.2")]
    if not all(os.path.exists(p) for p in libs) and shutil.which("make"):
        subprocess.run(["make", "-s", "-C", ROOT, "fakes"], capture_output=True, timeout=300)
    if not all(os.path.exists(p) for p in libs):
        pytest.skip("the fake CUDA/NCCL libraries are not built (make fakes)")


def test_nccl_comm_against_the_fakes_with_two_forked_ranks():
    fake_libs()
    out = subprocess.run([sys.executable, "-c", RANKS, FAKE_DIR], capture_output=True,
                         text=True, timeout=180, env=python_env(FAKE_CUDA_DEVICES="2",
                                                                **fake_paths()))
    assert out.returncode == 0 and out.stdout.split("\n")[:2] == ["[0, 0]", "[0, 0]"], (
        out.stdout + out.stderr)


def fake_paths():
    """The fakes forced (FASTSPAWN_*_LIBRARY), so that no copy torch loaded comes first."""
    return {"FASTSPAWN_NCCL_LIBRARY": os.path.join(FAKE_DIR, "libnccl.so.2"),
            "FASTSPAWN_CUDART_LIBRARY": os.path.join(FAKE_DIR, "libcudart.so.13")}


def test_nccl_comm_rejects_a_bad_unique_id():
    fake_libs()
    out = fresh(f"""
        import fastspawn._C as C
        C.cuda_load([{FAKE_DIR!r}]); C.nccl_load([{FAKE_DIR!r}])
        try:
            C.NcclComm(b"short", 0, 1, 0)
        except ValueError as e:
            print(e)
    """, **fake_paths())
    assert "unique_id must be 128 bytes, got 5" in out
