# Two commands on a fresh machine: `make demo` and `make test` (each installs into .venv if needed).
# torch==2.13.0 (CPU) is installed only when no torch is importable; a torch you already have
# (e.g. a CUDA build in your system Python) is reused through --system-site-packages, never replaced.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mim3d-installed
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test lint imports bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "Using the torch already installed for $(PYTHON) (venv with system site-packages)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

# 80 tiny MiM steps: about 3.5 min on 2 idle cores; the demo prints its own wall-clock and CPU
# time and the load average. A rerun continues an unfinished demo or reports the finished one.
demo: install
	$(VENV)/bin/mim3d demo --out runs/demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Lint (ruff is in the test extra) and the import rules of DESIGN.md §7 (seconds each).
lint: install
	$(PY) -m ruff check src tests benchmarks

imports: install
	$(PY) -m pytest -q -p no:cacheprovider tests/test_imports.py

bench: install
	$(PY) benchmarks/data_throughput.py

clean:
	rm -rf runs .pytest_cache build *.egg-info src/*.egg-info
