# beltsort: the two commands a fresh machine needs are `make demo` and `make test`.
# Both install what is missing first (`make install`: .venv in the repo root).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := runs/demo

.PHONY: install demo test lint format clean

install: $(STAMP)

# CPU onnxruntime here; the GPU image installs the `gpu` extra instead (never both).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,train,dev]'
	$(PY) -m training weights fetch
	touch $@

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(VENV)/bin/pytest

# The whole product on its built-in default: a crops dataset cut by the locator
# from simulated frames, a short fine-tune, the ONNX export, then the daemon on
# the simulated camera for DEMO_SECONDS with the reference subscriber printing
# its decisions. The model is kept in runs/demo and reused on the next run.
DEMO_SECONDS ?= 20
demo: install
	bash deploy/demo.sh $(DEMO) $(DEMO_SECONDS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
