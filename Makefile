# Every target that runs code creates .venv and installs the package on first use, so each one is
# a single command on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The backends suite's environment: .venv's packages (a .pth file adds its site-packages) plus
# JAX and torch. Kept apart because TensorFlow imports JAX wherever JAX is installed (about 1.7 s
# more per Python process that imports it), which every other suite would pay.
BACKENDS_VENV := .venv-backends
BACKENDS_PY := $(BACKENDS_VENV)/bin/python
BACKENDS_STAMP := $(BACKENDS_VENV)/.installed
SITE_PACKAGES = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# torch's CPU build: pip takes torch 2.13.0+cpu from its find-links folder on the CI machines, or
# from PyTorch's CPU index where PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu is set;
# elsewhere it falls back to PyPI's build of 2.13.0, which carries CUDA libraries of several GB.
TORCH ?= torch==2.13.0
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: venv demo test test-unit test-integration test-cluster test-connect test-backends test-backends-jax test-backends-torch test-integration-then-backends test-beside-integration lint format typecheck clean bench bench-quick

$(STAMP): pyproject.toml setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $(STAMP)

$(BACKENDS_STAMP): $(STAMP)
	test -x $(BACKENDS_PY) || $(PYTHON) -m venv $(BACKENDS_VENV)
	$(BACKENDS_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		| xargs -I{} sh -c 'echo "import site; site.addsitedir(\"$(SITE_PACKAGES)\")" > {}/skml-base.pth'
	$(BACKENDS_PY) -m pip install --quiet "jax>=0.4.30" "$(TORCH)"
	touch $(BACKENDS_STAMP)

venv: $(STAMP)

## The main job: fit → evaluate → save → load on an embedded local Spark.
demo: $(STAMP)
	$(PY) -m spark_keras_ml.demo

## Everything: lint, types, unit, integration (local[2]), cluster (local-cluster) and Connect tests.
## The integration suite runs beside lint, types and the unit, cluster and Connect suites (those
## one after the other): each spends much of its time waiting on JVMs, fresh interpreters and
## sockets, so two streams on two cores finish well before one, and the second stream is the
## shorter one. Each stream's output is printed whole when it ends.
test: $(BACKENDS_STAMP)
	$(MAKE) --no-print-directory -j2 --output-sync=target test-integration-then-backends \
		test-beside-integration

# The first stream of `make test`: the integration suite, then JAX's backends run.
test-integration-then-backends: $(STAMP)
	$(MAKE) --no-print-directory test-integration
	$(MAKE) --no-print-directory test-backends-jax

# The second stream of `make test`: lint and types, then one suite after the other (torch's
# backends run last, which evens the two streams out).
test-beside-integration: $(STAMP)
	$(MAKE) --no-print-directory lint typecheck
	$(MAKE) --no-print-directory test-unit
	$(MAKE) --no-print-directory test-cluster
	$(MAKE) --no-print-directory test-connect
	$(MAKE) --no-print-directory test-backends-torch

test-unit: $(STAMP)
	$(PYTEST) tests/unit

test-integration: $(STAMP)
	$(PYTEST) tests/integration

# Separate executor JVMs need their own SparkSession, hence their own pytest process.
# The GPU assignment script runs on JAX, in .venv-backends' Python.
test-cluster: $(STAMP) $(BACKENDS_STAMP)
	SKML_TEST_MASTER="local-cluster[2,1,1024]" SKML_BACKENDS_PYTHON=$(BACKENDS_PY) \
		$(PYTEST) -m cluster tests/cluster

# A Spark Connect client process: the suite starts (and stops) its own Connect servers.
test-connect: $(STAMP)
	$(PYTEST) -m connect tests/connect

# The main paths again on the other Keras backends, one process each (Keras picks its backend
# once, at import); every other suite runs TensorFlow. The folder's other modules check both
# backends from fresh interpreters: the torch run leaves them out.
test-backends: test-backends-jax test-backends-torch

test-backends-jax: $(BACKENDS_STAMP)
	KERAS_BACKEND=jax $(BACKENDS_PY) -m pytest -p no:cacheprovider -m backends tests/backends

test-backends-torch: $(BACKENDS_STAMP)
	KERAS_BACKEND=torch $(BACKENDS_PY) -m pytest -p no:cacheprovider -m backends \
		tests/backends/test_backends.py

lint: $(STAMP)
	$(VENV)/bin/ruff check spark_keras_ml tests benchmarks
	$(VENV)/bin/ruff format --check spark_keras_ml tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format spark_keras_ml tests benchmarks
	$(VENV)/bin/ruff check --fix spark_keras_ml tests benchmarks

## Benchmarks: ratios against references measured in the same run (docs/benchmarks.md).
# The backends section runs each backend in .venv-backends' Python.
bench: $(STAMP) $(BACKENDS_STAMP)
	SKML_BACKENDS_PYTHON=$(BACKENDS_PY) $(PY) -m benchmarks.run

bench-quick: $(STAMP) $(BACKENDS_STAMP)
	SKML_BACKENDS_PYTHON=$(BACKENDS_PY) $(PY) -m benchmarks.run --quick

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(BACKENDS_VENV) build *.egg-info spark-warehouse metastore_db derby.log
