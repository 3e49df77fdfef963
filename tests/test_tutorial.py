"""examples/tutorial_spawn.py, the canonical mp.spawn DDP tutorial with only the
import changed, trains under fastspawn exactly as it does under torch."""
import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import PACKAGE_DIR, ROOT

TUTORIAL = os.path.join(ROOT, "examples", "tutorial_spawn.py")
FASTSPAWN_IMPORT = ("import fastspawn as mp  # the one change; "
                    "was: import torch.multiprocessing as mp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script, *args):
    env = dict(os.environ, PYTHONPATH=PACKAGE_DIR)
    out = subprocess.run([sys.executable, str(script), "--port", str(free_port()), *args],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_the_only_change_is_the_import():
    source = open(TUTORIAL).read()
    assert source.count(FASTSPAWN_IMPORT) == 1
    assert "import torch.multiprocessing" not in source.replace(FASTSPAWN_IMPORT, "")


@pytest.mark.parametrize("nprocs", ["2", "4"])
def test_tutorial_trains_like_under_torch(tmp_path, nprocs):
    torch_version = tmp_path / "tutorial_torch.py"
    torch_version.write_text(open(TUTORIAL).read().replace(
        FASTSPAWN_IMPORT, "import torch.multiprocessing as mp"))
    args = ("--nprocs", nprocs, "--epochs", "3")
    ours = run(TUTORIAL, *args)
    theirs = run(torch_version, *args)
    losses = re.findall(r"epoch \d+: loss ([0-9.]+)", ours)
    assert len(losses) == 3 and float(losses[-1]) < float(losses[0])
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", ours).group(1))
    assert accuracy > 0.8
    assert ours == theirs  # same data order, same gloo reductions: the same numbers
