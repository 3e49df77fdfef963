"""Where the backend's shared-memory segment lives, and a full /dev/shm (issue 8, #7).

Docker's default /dev/shm is 64 MB. Each test runs a job in a private mount namespace
(`unshare --mount`) with a 1 MiB tmpfs over /dev/shm: the default segment (a memfd) does
not live there and works; a named one (FASTSPAWN_SHM=named) must fail at set-up with an
error that names /dev/shm and the size, and no rank may die by SIGBUS.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import PACKAGE_DIR

# Runs inside the namespace: mount the small /dev/shm, run a 2-rank all_reduce whose
# chunked algorithm writes every rank's slot (4 MiB of float32), print the outcome.
JOB = r"""
import json, os, subprocess, sys
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/dev/shm"], check=True)
import torch, torch.distributed as dist
import fastspawn

def rank(i):
    fastspawn.init_process_group()
    t = torch.ones(1 << 20)
    dist.all_reduce(t)
    return float(t[0])

out = {}
try:
    out["results"] = fastspawn.spawn(rank, nprocs=2, start_method="fork")
except fastspawn.ProcessException as e:
    out["error"] = str(e)
    out["failures"] = [{"signal": f.signal_name, "exit_code": f.exit_code,
                        "exception": type(f.exception).__name__ if f.exception else None,
                        "message": str(f.exception) if f.exception else None}
                       for f in e.failures]
out["shm_left"] = [n for n in os.listdir("/dev/shm") if n.startswith("fastspawn")]
print("RESULT " + json.dumps(out), flush=True)
"""


def _namespaces_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_available(),
                                reason="needs root and a private mount namespace (unshare -m)")


def _run_with_small_dev_shm(tmp_path, shm_mode):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = dict(os.environ, PYTHONPATH=PACKAGE_DIR)
    env.pop("FASTSPAWN_SHM", None)
    if shm_mode is not None:
        env["FASTSPAWN_SHM"] = shm_mode
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                           str(script)], capture_output=True, text=True, timeout=120, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"the job printed no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_memfd_segment_does_not_need_dev_shm(tmp_path):
    out = _run_with_small_dev_shm(tmp_path, None)
    assert out.get("results") == [2.0, 2.0], out
    assert out["shm_left"] == []


def test_full_dev_shm_is_a_clear_error_not_sigbus(tmp_path):
    out = _run_with_small_dev_shm(tmp_path, "named")
    assert "results" not in out, out
    assert all(f["signal"] != "SIGBUS" for f in out["failures"]), out
    root = out["failures"][0]
    assert root["exception"] == "MemoryError", out
    msg = root["message"]
    assert "/dev/shm" in msg and "MiB" in msg and "--shm-size" in msg, msg
    assert "FASTSPAWN_SLOT_BYTES" in msg, msg
    assert out["shm_left"] == [], out
