# Two commands for a fresh machine (Debian/Ubuntu, Python >= 3.10):
#   make run    set up, then run the whole pipeline locally on a synthetic sample
#   make test   set up (package, test tools, Slurm test cluster packages), then lint and test
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
	@if [ "$$(id -u)" = 0 ]; then bash tests/slurm/testbed.sh install; \
	else echo "not root: the Slurm test cluster cannot be installed; slurm tests will skip"; fi

run: setup
	hpcpipe submit --local --wait
	hpcpipe summarize

lint:
	ruff check .
	mypy

test: setup-test lint
	$(PY) -m pytest -q

bench-features:
	$(PY) bench/bench_features.py

bench-train:
	$(PY) bench/bench_train.py
