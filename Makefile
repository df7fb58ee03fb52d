# The two commands of the README, for a fresh machine:
#   make demo   set up, pretrain on Fashion-MNIST, evaluate, export (about 30 min on 2 CPU cores)
#   make test   set up (with the tests' extras: pytest, PyTorch's CPU build) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/fashion_mnist
CONFIG ?= configs/fashion_mnist.py
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

.PHONY: setup setup-test data demo lint test test-fast test-gpu-matrix bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install -q -e ".[serving]"
	touch $@

# The tests' extras, for make test only. PyTorch only reads .pth checkpoints (vicreg-import and
# its tests); pinned to the CPU build these machines carry in /opt/wheels, since a bare "torch"
# resolves to a CUDA build of GBs.
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,serving]"
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.test-installed

# Fashion-MNIST comes from Debian's package (tensorflow-datasets cannot download offline).
data:
	@if [ -n "$$VICREG_DATA_DIR" ] || [ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'," \
	  "or set VICREG_DATA_DIR to a directory with the four IDX .gz files"; exit 1; fi

demo: setup data
	$(VENV)/bin/vicreg-train --config=$(CONFIG) --workdir=$(WORKDIR)
	$(VENV)/bin/vicreg-eval --config=$(CONFIG) --backbone=$(WORKDIR)/backbone.keras

# The linter first (ruff: pyflakes, pycodestyle, isort; pyproject.toml), then the suite on
# TEST_WORKERS processes (pytest-xdist), a test module per worker at a time (tests/conftest.py
# orders the modules, longest first, and gives each worker its share of the cores).
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
lint: setup-test
	$(VENV)/bin/ruff check .

test: setup-test data lint
	$(PY) -m pytest -q --durations=15 $(PARALLEL)

test-fast: setup-test data
	$(PY) -m pytest -q -m "not large" $(PARALLEL)

# All 192 cells of the GPU-path matrix (the default suite runs a covering subset of 17).
test-gpu-matrix: setup-test data
	$(PY) -m pytest -q tests/test_gpu_paths.py -k matrix_cell --gpu-matrix=full

bench: setup data
	$(PY) -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache
