# Two entry points for a fresh machine (README.md):
#   make run   -- install what is needed, build, and mount the default drive
#                 (built-in controller on a sparse 1 GiB image) on ./mnt
#   make test  -- install what is needed, build, and run the test suite
# Everything below is idempotent and fast when already done.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
SYSPKGS := fuse3 libfuse3-dev liburing-dev libisal-dev pkg-config fio e2fsprogs util-linux \
           qemu-system-x86 busybox-static kmod cpio
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
MNT     ?= $(CURDIR)/mnt
MOUNT_ARGS ?=

.PHONY: run test sysdeps venv build debug test-debug bench fuzz clean

sysdeps:
	@missing=""; for p in $(SYSPKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q cython setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: sysdeps $(VENV)/.installed

build: venv
	$(PY) setup.py -q build_ext --inplace

# assertions, bounds checks and Cython line tracing (NVMEFS_DEBUG=1)
debug: venv
	NVMEFS_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force

run: build
	mkdir -p $(MNT)
	$(VENV)/bin/nvmefs mount $(MNT) $(MOUNT_ARGS)

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

test-debug: debug
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) setup.py -q build_ext --inplace --force

# the fio matrix compares against bench/cmemfs (C on libfuse) and
# qemu-storage-daemon (Debian qemu-system-common)
bench: build
	@dpkg -s qemu-system-common >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq qemu-system-common; }
	$(PY) -m pip install -q -e '.[bench]'
	mkdir -p bench/results
	cc -O2 -Wall -Wextra -o bench/cmemfs bench/cmemfs.c $$(pkg-config --cflags --libs fuse3)
	$(PY) bench/core_bench.py --json bench/results/core_bench.json
	$(PY) bench/ioworker.py --json bench/results/ioworker.json
	$(PY) bench/fio_bench.py --out bench/results

# the model fuzzer's long run (a short one is in the test suite)
FUZZ_SECONDS ?= 300
fuzz: build
	$(PY) tests/fuzz_model.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf build $(VENV) nvmefs/*.so _core/*.c _core/*.html
