# Every target that runs code creates .venv and installs the package on first use, so each one is
# a single command on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The tests run every Keras backend, torch's on its CPU build: pip takes torch 2.13.0+cpu from its
# find-links folder on the CI machines, or from PyTorch's CPU index where
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu is set; elsewhere it falls back to
# PyPI's build of 2.13.0, which carries CUDA libraries of several GB.
TORCH ?= torch==2.13.0
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: venv demo test test-unit test-integration test-cluster test-connect test-backends test-beside-integration lint format typecheck clean bench bench-quick

$(STAMP): pyproject.toml setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,demo]" "$(TORCH)"
	touch $(STAMP)

venv: $(STAMP)

## The main job: fit → evaluate → save → load on an embedded local Spark.
demo: $(STAMP)
	$(PY) -m spark_keras_ml.demo

## Everything: lint, types, unit, integration (local[2]), cluster (local-cluster) and Connect tests.
## The integration suite runs beside the unit, cluster and Connect suites (those one after the
## other): each spends much of its time waiting on JVMs, fresh interpreters and sockets, so two
## streams on two cores finish well before one. Each stream's output is printed whole when it ends.
test: lint typecheck
	$(MAKE) --no-print-directory -j2 --output-sync=target test-integration test-beside-integration

# The second stream of `make test`: one suite after the other.
test-beside-integration: $(STAMP)
	$(MAKE) --no-print-directory test-unit
	$(MAKE) --no-print-directory test-backends
	$(MAKE) --no-print-directory test-cluster
	$(MAKE) --no-print-directory test-connect

test-unit: $(STAMP)
	$(PYTEST) tests/unit

test-integration: $(STAMP)
	$(PYTEST) tests/integration

# Separate executor JVMs need their own SparkSession, hence their own pytest process.
test-cluster: $(STAMP)
	SKML_TEST_MASTER="local-cluster[2,1,1024]" $(PYTEST) -m cluster tests/cluster

# A Spark Connect client process: the suite starts (and stops) its own Connect servers.
test-connect: $(STAMP)
	$(PYTEST) -m connect tests/connect

# The main paths again on the other Keras backends, one process each (Keras picks its backend
# once, at import); every other suite runs TensorFlow.
test-backends: $(STAMP)
	KERAS_BACKEND=jax $(PYTEST) -m backends tests/backends
	KERAS_BACKEND=torch $(PYTEST) -m backends tests/backends

lint: $(STAMP)
	$(VENV)/bin/ruff check spark_keras_ml tests benchmarks
	$(VENV)/bin/ruff format --check spark_keras_ml tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format spark_keras_ml tests benchmarks
	$(VENV)/bin/ruff check --fix spark_keras_ml tests benchmarks

## Benchmarks: ratios against references measured in the same run (docs/benchmarks.md).
bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info spark-warehouse metastore_db derby.log
