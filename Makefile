# Two commands for a fresh machine (Debian/Ubuntu, Python >= 3.10):
#   make run    set up, then run the whole pipeline locally on a synthetic sample
#   make test   set up (package, test tools, Slurm 22.05 and 25.11 test clusters), lint and test
PY ?= python3
PIP = $(PY) -m pip
# The CPU build of torch must come first: an unpinned torch requirement pulls the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup setup-test run test lint bench-features bench-train bench-status

# `make run` installs the package as users do (pip install ., not -e); `make test` installs it
# editable, for development, and tests the built wheel separately (tests/test_wheel.py).
setup:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q .

setup-test:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	@if [ "$$(id -u)" = 0 ]; then bash tests/slurm/testbed.sh install && \
		bash tests/slurm/testbed.sh build-25.11; \
	else echo "not root: the Slurm test clusters cannot be installed; slurm tests will skip"; fi

run: setup
	hpcpipe submit --local --wait
	hpcpipe summarize

lint:
	ruff check .
	mypy

# Every test on Debian's Slurm 22.05, then the slurm-marked ones again on Slurm 25.11.7. The 22.05
# cluster (and the machine's munged it started) is stopped first: 25.11 must stand on its own.
test: setup-test lint
	HPCPIPE_TESTBED_STOP=1 $(PY) -m pytest -q
	HPCPIPE_SLURM_VERSION=25.11 $(PY) -m pytest -q -m slurm

bench-features:
	$(PY) bench/bench_features.py

bench-train:
	$(PY) bench/bench_train.py
