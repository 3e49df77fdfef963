"""Build the fastspawn._C extension from csrc/*.c.

Only CPython headers and libc are needed: no CUDA, NCCL or libtorch at build
time (NCCL is loaded with dlopen at run time). Set FASTSPAWN_SANITIZE=1 to
build with AddressSanitizer + UndefinedBehaviorSanitizer (see `make sanitize`).
"""
import glob
import os

from setuptools import Extension, setup

CFLAGS = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-O2",
          "-fvisibility=hidden", "-Wno-missing-field-initializers"]
LDFLAGS = ["-lpthread", "-ldl"]
if os.environ.get("FASTSPAWN_SANITIZE"):
    CFLAGS += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
    LDFLAGS += ["-fsanitize=address,undefined"]

# csrc/lib/ (the C library) and csrc/python/ (the binding): the layout the tree is moving to.
sources = sorted(glob.glob("csrc/*.c") + glob.glob("csrc/lib/*.c") + glob.glob("csrc/python/*.c"))

setup(
    ext_modules=[
        Extension(
            "fastspawn._C",
            sources=sources,
            include_dirs=["csrc/include", "csrc"],
            depends=glob.glob("csrc/*.h") + glob.glob("csrc/lib/*.h") + glob.glob("csrc/include/*/*.h"),
            extra_compile_args=CFLAGS,
            extra_link_args=LDFLAGS,
        )
    ],
)
