# fastspawn developer entry points. The README's two commands:
#   make train   - the main job (DDP training through fastspawn on CPU)
#   make test    - C tests + pytest suite
.PHONY: bootstrap build test ctest pytest sanitize lint format train bench fuzz clean fakes

PY := scripts/py
CC ?= gcc
CFLAGS_C := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -g -Wno-missing-field-initializers -Icsrc/include -Icsrc
SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
# The C library without the CPython binding (module.c, py_*.c): usable from plain C.
# csrc/lib/ holds the files already written for the include/ lib/ python/ layout.
LIB_SRC := $(filter-out csrc/module.c $(wildcard csrc/py_*.c),$(wildcard csrc/*.c)) $(wildcard csrc/lib/*.c)
LIB_HDR := $(wildcard csrc/*.h csrc/lib/*.h csrc/include/*.h csrc/include/fastspawn/*.h)
CTEST_SRC := $(wildcard tests/c/test_*.c)
CTEST_BIN := $(patsubst tests/c/%.c,tests/c/bin/%,$(CTEST_SRC))
CTEST_SAN_BIN := $(patsubst tests/c/%.c,tests/c/bin/san_%,$(CTEST_SRC))
PYTEST_ARGS ?=

bootstrap:
	scripts/bootstrap.sh

build: bootstrap

tests/c/bin/libfastspawn.a: $(LIB_SRC) $(LIB_HDR)
	@mkdir -p tests/c/bin/obj
	@for f in $(LIB_SRC); do $(CC) $(CFLAGS_C) -fPIC -c $$f -o tests/c/bin/obj/$$(basename $$f .c).o || exit 1; done
	ar rcs $@ tests/c/bin/obj/*.o

# Tests may include the library's private headers (test_nccl: cuda_abi.h) and the fakes' one.
TEST_INC := -Icsrc/lib -Itests/c/fake_cuda

tests/c/bin/%: tests/c/%.c tests/c/fs_test.h tests/c/bin/libfastspawn.a
	$(CC) $(CFLAGS_C) $(TEST_INC) $< tests/c/bin/libfastspawn.a -lpthread -ldl -lm -o $@

tests/c/bin/san_%: tests/c/%.c tests/c/fs_test.h $(LIB_SRC) $(LIB_HDR)
	@mkdir -p tests/c/bin
	$(CC) $(CFLAGS_C) $(TEST_INC) -O1 $(SAN) $< $(LIB_SRC) -lpthread -ldl -lm -o $@

# Fake CUDA runtime + NCCL (no GPU needed) that test_nccl loads from tests/c/bin/fake/.
FAKE_DIR := tests/c/bin/fake
FAKE_LIBS := $(FAKE_DIR)/libcudart.so.13 $(FAKE_DIR)/libnccl.so.2
FAKE_CFLAGS := $(CFLAGS_C) $(TEST_INC) -fPIC -shared

$(FAKE_DIR)/libcudart.so.13: tests/c/fake_cuda/fake_cudart.c tests/c/fake_cuda/fake.h $(LIB_HDR)
	@mkdir -p $(FAKE_DIR)
	$(CC) $(FAKE_CFLAGS) -Wl,-soname,libcudart.so.13 $< -lpthread -o $@

$(FAKE_DIR)/libnccl.so.2: tests/c/fake_cuda/fake_nccl.c tests/c/fake_cuda/fake.h $(LIB_HDR) $(FAKE_DIR)/libcudart.so.13
	$(CC) $(FAKE_CFLAGS) -Wl,-soname,libnccl.so.2 $< -L$(FAKE_DIR) -l:libcudart.so.13 \
	    -Wl,-rpath,'$$ORIGIN' -lpthread -lm -o $@

fakes: $(FAKE_LIBS)
tests/c/bin/test_nccl tests/c/bin/san_test_nccl: $(FAKE_LIBS)

ctest: $(CTEST_BIN)
	scripts/run_ctests.sh $(CTEST_BIN)

pytest: bootstrap fakes
	scripts/run_pytest.sh $(PYTEST_ARGS)

# The README's test command.
test: bootstrap ctest pytest

# C tests and the Python suite under AddressSanitizer + UndefinedBehaviorSanitizer.
sanitize: bootstrap fakes $(CTEST_SAN_BIN)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    scripts/run_ctests.sh $(CTEST_SAN_BIN)
	scripts/sanitize_pytest.sh $(PYTEST_ARGS)

lint:
	scripts/lint.sh

format:
	clang-format -i csrc/*.c csrc/*.h csrc/lib/*.[ch] csrc/include/fastspawn/*.h csrc/python/*.c \
	    tests/c/*.c tests/c/*.h tests/c/fake_cuda/*.[ch] tests/c/abi/*.c

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
	rm -rf build tests/c/bin python/fastspawn/*.so
