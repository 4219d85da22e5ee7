# Everything the project needs is installed from here: a venv with pinned torch==2.13.0 (CPU build),
# the Python deps, and the C++ extension built against that torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CPP_SOURCES := $(wildcard csrc/*.cpp csrc/*.h) CMakeLists.txt setup.py

.PHONY: all venv build demo test test-fast lint format bench clean

all: build

$(VENV)/.deps-stamp: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps-stamp

$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(CPP_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.build-stamp

demo: build
	$(VENV)/bin/specdiff demo --overwrite

test: build
	$(PY) -m pytest python_tests -q

# a quicker subset: without the tests marked slow (packaging: fresh venvs, full builds) and the
# Triton kernels run by the interpreter on CPU; `make test` runs everything
test-fast: build
	$(PY) -m pytest python_tests -q -m "not slow" -k "not triton"

# ruff (pinned in requirements-dev.txt, config in pyproject.toml): lint, import order and format
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: build
	$(PY) bench/bench_verify.py

clean:
	rm -rf $(VENV) build *.egg-info specdiff_kernels/_C*.so
