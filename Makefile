# fastspawn developer entry points. The README's two commands:
#   make train   - the main job (DDP training through fastspawn on CPU)
#   make test    - C tests + pytest suite
.PHONY: bootstrap build lib test ctest pytest sanitize lint format train bench fuzz clean

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

tests/c/bin/%: tests/c/%.c tests/c/fs_test.h $(LIB)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS_C) $< $(LIB) $(LDLIBS_C) -o $@

tests/c/bin/san_%: tests/c/%.c tests/c/fs_test.h $(LIB_SAN)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS_SAN) $< $(LIB_SAN) $(LDLIBS_C) $(FS_SAN_LDFLAGS) -o $@

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

pytest: bootstrap
	scripts/run_pytest.sh $(PYTEST_ARGS)

# The README's test command.
test: bootstrap ctest pytest

# C tests, C examples and the Python suite under AddressSanitizer + UndefinedBehaviorSanitizer.
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize: bootstrap $(CTEST_SAN_BIN) $(EXAMPLE_SAN_BIN)
	$(SAN_ENV) scripts/run_ctests.sh $(CTEST_SAN_BIN)
	$(SAN_ENV) scripts/run_examples.sh $(EXAMPLE_SAN_BIN)
	scripts/sanitize_pytest.sh $(PYTEST_ARGS)

lint:
	scripts/lint.sh

C_FILES = $(wildcard csrc/include/*.h csrc/include/fastspawn/*.h csrc/lib/*.[ch] \
    csrc/python/*.[ch] tests/c/*.[ch] tests/fuzz/*.c examples/c/*.c)
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

clean:
	rm -rf build tests/c/bin examples/c/bin python/fastspawn/*.so
