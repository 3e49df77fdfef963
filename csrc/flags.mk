# csrc/flags.mk - the one definition of how libfastspawn and fastspawn._C are compiled.
# The Makefile includes this file; setup.py parses its `FS_NAME := words` lines. Keep it
# to that form (plain words, no make variables or functions) so both read it the same.

# Every build, including what a user's `pip install` compiles.
FS_CFLAGS := -std=c11 -D_GNU_SOURCE -O2 -Wall -Wextra -Wno-missing-field-initializers -fvisibility=hidden -pthread
# Development builds only: the Makefile (make test, make ctest, CI) and setup.py with
# FASTSPAWN_DEV=1 (scripts/bootstrap.sh). Never part of a user's install.
FS_DEV_CFLAGS := -Werror -g
# make sanitize and setup.py with FASTSPAWN_SANITIZE=1: AddressSanitizer + UBSan.
FS_SAN_CFLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
FS_SAN_LDFLAGS := -fsanitize=address,undefined
# What linking libfastspawn needs (-ldl: dlopen of NCCL and the CUDA runtime, glibc < 2.34).
FS_LDLIBS := -pthread -ldl
