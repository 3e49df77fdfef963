"""Packaging: what a user's `pip install` gets.

`pip wheel --no-build-isolation --no-deps .` on a copy of the tree builds a wheel with
the user flags (no -Werror, no sanitizer); the wheel installs into a fresh venv and
imports there, from outside the repository, with its own fastspawn._C.
"""
import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Build outputs and caches of the working tree: the copy must build from sources alone.
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                ".pytest_cache", "*.so", "*.o", "*.a", "bin", "fuzz-out",
                                ".fs-python", ".whl", ".devcarry", "gpu-out")


def _user_env() -> dict:
    env = dict(os.environ)
    for name in ("FASTSPAWN_DEV", "FASTSPAWN_SANITIZE", "PYTHONPATH", "CFLAGS", "LDFLAGS",
                 "FASTSPAWN_TEST_PACKAGE_DIR"):
        env.pop(name, None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_installs_into_a_fresh_venv_and_imports(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
         "--no-index", "-w", str(wheels), str(src)],
        capture_output=True, text=True, env=_user_env(), timeout=800)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    log = build.stdout + build.stderr
    assert "csrc/lib/reduce.c" in log and "csrc/python/module.c" in log  # compiled here
    assert "-Werror" not in log and "-fsanitize" not in log  # user flags only

    (whl,) = wheels.glob("fastspawn-*.whl")
    from fastspawn._version import __version__
    assert whl.name.startswith(f"fastspawn-{__version__}-")
    names = zipfile.ZipFile(whl).namelist()
    assert "fastspawn/py.typed" in names and "fastspawn/_C.pyi" in names
    assert any(n.startswith("fastspawn/_C.") and n.endswith(".so") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.endswith(".a") or n.startswith("csrc/") for n in names)
    metadata = zipfile.ZipFile(whl).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: BSD-3-Clause" in metadata
    assert f"Version: {__version__}" in metadata

    # A fresh venv. --system-site-packages shows the *base* interpreter's packages, which
    # need not have torch (a venv made from .venv's python has pyenv's as its base), so
    # this interpreter's site directories (torch, cloudpickle) are added with a .pth
    # file. Paths a .pth adds come after the venv's own site-packages, and .pth files
    # in them are not run: the editable install of the working tree stays out of sight.
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)],
                   check=True, timeout=300)
    vpy = env_dir / "bin" / "python"
    purelib = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True
                             ).stdout.strip()
    dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(d)]
    with open(os.path.join(purelib, "outer-site.pth"), "w") as fh:
        fh.write("\n".join(dirs) + "\n")
    subprocess.run([str(vpy), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)],
                   check=True, env=_user_env(), timeout=300)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = ("import fastspawn, fastspawn._C as C, torch, sys; "
             "print(fastspawn.__version__); print(C.__file__); print(fastspawn.__file__); "
             "print(C.store_make_token()[:4]); print(sys.prefix)")
    run = subprocess.run([str(vpy), "-c", probe], capture_output=True, text=True,
                         cwd=str(outside), env=_user_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    version, c_file, py_file, _token, prefix = run.stdout.split()
    assert version == __version__
    assert os.path.realpath(c_file).startswith(os.path.realpath(env_dir)), c_file
    assert os.path.realpath(py_file).startswith(os.path.realpath(env_dir)), py_file
    assert os.path.realpath(prefix) == os.path.realpath(env_dir)
