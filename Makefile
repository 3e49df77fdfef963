# fastspawn developer entry points. The README's two commands:
#   make train   - the main job (DDP training through fastspawn on CPU)
#   make test    - C tests + pytest suite
.PHONY: bootstrap build lib test ctest pytest sanitize lint format train bench fuzz clean fakes \
    test-torch-2.1

# FS_CFLAGS, FS_DEV_CFLAGS, FS_SAN_*, FS_LDLIBS: shared with setup.py.
include csrc/flags.mk

PY := scripts/py
CC ?= gcc
# libfastspawn (every csrc/lib/*.c) is built by setup.py's build_clib with the flags of
# csrc/flags.mk (FASTSPAWN_DEV=1: -Werror); the extension, the C tests and the C examples
# link that same archive.
LIB_DEPS := $(wildcard csrc/lib/*.c csrc/lib/*.h csrc/include/*.h csrc/include/fastspawn/*.h) \
    csrc/flags.mk setup.py
LIB := build/clib-dev/libfastspawn.a
LIB_SAN := build/clib-dev-san/libfastspawn.a
# The C tests may look inside (csrc/lib's private headers); the examples see only the
# public headers, as any C program using the library would.
CFLAGS_C := $(FS_CFLAGS) $(FS_DEV_CFLAGS) -Icsrc/include -Icsrc/lib
CFLAGS_SAN := $(CFLAGS_C) $(FS_SAN_CFLAGS)
CFLAGS_EX := $(FS_CFLAGS) $(FS_DEV_CFLAGS) -Icsrc/include
LDLIBS_C := $(FS_LDLIBS) -lm
CTEST_SRC := $(wildcard tests/c/test_*.c)
CTEST_BIN := $(patsubst tests/c/%.c,tests/c/bin/%,$(CTEST_SRC))
CTEST_SAN_BIN := $(patsubst tests/c/%.c,tests/c/bin/san_%,$(CTEST_SRC))
EXAMPLE_SRC := $(wildcard examples/c/*.c)
EXAMPLE_BIN := $(patsubst examples/c/%.c,examples/c/bin/%,$(EXAMPLE_SRC))
EXAMPLE_SAN_BIN := $(patsubst examples/c/%.c,examples/c/bin/san_%,$(EXAMPLE_SRC))
PYTEST_ARGS ?=

bootstrap:
	scripts/bootstrap.sh

build: bootstrap

.fs-python:
	scripts/bootstrap.sh

lib: $(LIB)

$(LIB): $(LIB_DEPS) | .fs-python
	FASTSPAWN_DEV=1 $(PY) setup.py -q build_clib
	@touch $@

$(LIB_SAN): $(LIB_DEPS) | .fs-python
	FASTSPAWN_DEV=1 FASTSPAWN_SANITIZE=1 $(PY) setup.py -q build_clib
	@touch $@

# The C tests also see the fake CUDA runtime's header (tests/c/fake_cuda/fake.h).
TEST_INC := -Itests/c/fake_cuda

tests/c/bin/%: tests/c/%.c tests/c/fs_test.h $(LIB)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS_C) $(TEST_INC) $< $(LIB) $(LDLIBS_C) -o $@

tests/c/bin/san_%: tests/c/%.c tests/c/fs_test.h $(LIB_SAN)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS_SAN) $(TEST_INC) $< $(LIB_SAN) $(LDLIBS_C) $(FS_SAN_LDFLAGS) -o $@

# A fake CUDA runtime + NCCL (host memory for device memory, threads for streams, several
# processes rendezvousing for real): test_nccl and tests/test_nccl_loader.py load them.
FAKE_DIR := tests/c/bin/fake
FAKE_LIBS := $(FAKE_DIR)/libcudart.so.13 $(FAKE_DIR)/libnccl.so.2
FAKE_CFLAGS := $(CFLAGS_C) $(TEST_INC) -fPIC -shared -fvisibility=default  # they export an ABI
FAKE_HDRS := tests/c/fake_cuda/fake.h csrc/lib/cuda_abi.h csrc/lib/nccl_abi.h

# -Bsymbolic: their calls to their own functions stay theirs even where a CUDA build of torch
# has loaded the real libraries (RTLD_GLOBAL); the fake NCCL opens the fake runtime next to it.
$(FAKE_DIR)/libcudart.so.13: tests/c/fake_cuda/fake_cudart.c $(FAKE_HDRS)
	@mkdir -p $(FAKE_DIR)
	$(CC) $(FAKE_CFLAGS) -Wl,-soname,libcudart.so.13 -Wl,-Bsymbolic $< -pthread -o $@

$(FAKE_DIR)/libnccl.so.2: tests/c/fake_cuda/fake_nccl.c $(FAKE_HDRS) $(FAKE_DIR)/libcudart.so.13
	$(CC) $(FAKE_CFLAGS) -Wl,-soname,libnccl.so.2 -Wl,-Bsymbolic $< -pthread -ldl -lm -o $@

fakes: $(FAKE_LIBS)
tests/c/bin/test_nccl tests/c/bin/san_test_nccl: $(FAKE_LIBS)

examples/c/bin/%: examples/c/%.c $(LIB)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS_EX) $< $(LIB) $(LDLIBS_C) -o $@

examples/c/bin/san_%: examples/c/%.c $(LIB_SAN)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS_EX) $(FS_SAN_CFLAGS) $< $(LIB_SAN) $(LDLIBS_C) $(FS_SAN_LDFLAGS) -o $@

# The C tests, then the C examples (each must exit 0).
ctest: $(CTEST_BIN) $(EXAMPLE_BIN)
	scripts/run_ctests.sh $(CTEST_BIN)
	scripts/run_examples.sh $(EXAMPLE_BIN)

pytest: bootstrap fakes
	scripts/run_pytest.sh $(PYTEST_ARGS)

# The README's test command.
test: bootstrap ctest pytest

# C tests, C examples and the Python suite under AddressSanitizer + UndefinedBehaviorSanitizer.
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize: bootstrap fakes $(CTEST_SAN_BIN) $(EXAMPLE_SAN_BIN)
	$(SAN_ENV) scripts/run_ctests.sh $(CTEST_SAN_BIN)
	$(SAN_ENV) scripts/run_examples.sh $(EXAMPLE_SAN_BIN)
	scripts/sanitize_pytest.sh $(PYTEST_ARGS)

# C (clang-format, cppcheck, clang-tidy), then Python (ruff, mypy).
lint:
	scripts/lint.sh
	scripts/lint_python.sh

C_FILES = $(wildcard csrc/include/*.h csrc/include/fastspawn/*.h csrc/lib/*.[ch] \
    csrc/python/*.[ch] tests/c/*.[ch] tests/c/fake_cuda/*.[ch] tests/c/abi/*.[ch] \
    tests/fuzz/*.c examples/c/*.c)
format:
	clang-format -i $(C_FILES)

# The README's main command.
train: bootstrap
	$(PY) examples/train_ddp.py

bench: bootstrap
	$(PY) bench/spawn.py

# libFuzzer on the store's frame parser for FUZZ_SECONDS (default 60).
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz_store.sh $(FUZZ_SECONDS)

# The suite on the oldest torch the package supports (a venv of its own, .venv-torch-2.1.0).
test-torch-2.1:
	scripts/test_torch_version.sh 2.1.0

clean:
	rm -rf build tests/c/bin examples/c/bin python/fastspawn/*.so
