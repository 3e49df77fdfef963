"""Build libfastspawn (csrc/lib/, plain C) and the fastspawn._C extension (csrc/python/).

The C library is built once, as a static archive (build_clib: build/clib*/libfastspawn.a),
and linked into fastspawn._C; the C tests and examples (make ctest) link the same archive.
Only CPython headers and libc are needed: no CUDA, NCCL or libtorch at build time (NCCL is
loaded with dlopen at run time). Every csrc/lib/*.c is part of the library and every
csrc/python/*.c part of the binding: new files need no edit here.

Compiler flags come from csrc/flags.mk, which the Makefile includes too:
  FS_CFLAGS      every build, including a user's `pip install`
  FS_DEV_CFLAGS  added with FASTSPAWN_DEV=1 (scripts/bootstrap.sh, the Makefile): -Werror
  FS_SAN_*       added with FASTSPAWN_SANITIZE=1 (make sanitize): ASan + UBSan
Each combination builds in its own folder (build/clib, build/clib-dev, build/clib-dev-san).
"""
import contextlib
import glob
import os
import re
import shutil

from setuptools import Extension, setup
from setuptools.command.build_clib import build_clib
from setuptools.command.build_ext import build_ext


def read_flags(path: str) -> dict:
    """The `FS_NAME := words` lines of csrc/flags.mk."""
    flags = {}
    with open(path) as fh:
        for line in fh:
            m = re.match(r"^(FS_\w+)\s*:=\s*(.*?)\s*$", line)
            if m:
                flags[m.group(1)] = m.group(2).split()
    return flags


FLAGS = read_flags(os.path.join("csrc", "flags.mk"))
DEV = os.environ.get("FASTSPAWN_DEV") == "1"
SANITIZE = os.environ.get("FASTSPAWN_SANITIZE") == "1"
CFLAGS = (FLAGS["FS_CFLAGS"] + (FLAGS["FS_DEV_CFLAGS"] if DEV else [])
          + (FLAGS["FS_SAN_CFLAGS"] if SANITIZE else []))
LDFLAGS = FLAGS["FS_LDLIBS"] + (FLAGS["FS_SAN_LDFLAGS"] if SANITIZE else [])
VARIANT = ("-dev" if DEV else "") + ("-san" if SANITIZE else "")
CLIB_DIR = os.path.join("build", "clib" + VARIANT)

LIB_SOURCES = sorted(glob.glob("csrc/lib/*.c"))
HEADERS = sorted(glob.glob("csrc/include/*.h") + glob.glob("csrc/include/fastspawn/*.h")
                 + glob.glob("csrc/lib/*.h"))
EXT_SOURCES = sorted(glob.glob("csrc/python/*.c"))


class BuildClib(build_clib):
    """build_clib into this flag combination's own folder, starting afresh when the list
    of sources or the flags changed (setuptools only compares timestamps, and `ar`
    would keep the object of a removed source in the archive)."""

    def finalize_options(self):
        if self.build_clib is None:
            self.build_clib = CLIB_DIR
        if self.build_temp is None:
            self.build_temp = os.path.join(CLIB_DIR, "obj")
        super().finalize_options()

    def run(self):
        manifest = os.path.join(self.build_clib, "libfastspawn.manifest")
        want = "\n".join(LIB_SOURCES + CFLAGS) + "\n"
        try:
            with open(manifest) as fh:
                have = fh.read()
        except OSError:
            have = None
        if have != want:
            shutil.rmtree(self.build_temp, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.build_clib, "libfastspawn.a"))
        super().run()
        with open(manifest, "w") as fh:
            fh.write(want)


class BuildExt(build_ext):
    """build_ext that first brings libfastspawn up to date (plain build_ext does not)."""

    def finalize_options(self):
        if self.build_temp is None and VARIANT:
            self.build_temp = os.path.join("build", "temp" + VARIANT)
        super().finalize_options()

    def run(self):
        self.run_command("build_clib")
        super().run()


setup(
    libraries=[(
        "fastspawn",
        {
            "sources": LIB_SOURCES,
            "include_dirs": ["csrc/include", "csrc/lib"],
            "cflags": CFLAGS,
            "obj_deps": {"": HEADERS + ["csrc/flags.mk"]},
        },
    )],
    ext_modules=[
        Extension(
            "fastspawn._C",
            sources=EXT_SOURCES,
            include_dirs=["csrc/include", "csrc/python"],
            depends=HEADERS + glob.glob("csrc/python/*.h")
            + [os.path.join(CLIB_DIR, "libfastspawn.a")],
            extra_compile_args=CFLAGS,
            extra_link_args=LDFLAGS,
        )
    ],
    cmdclass={"build_clib": BuildClib, "build_ext": BuildExt},
)
