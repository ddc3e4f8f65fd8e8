# Two entry points for a fresh machine; each sets up .venv first (once, again when pyproject changes).
#   make demo   train a small LoopGPT on the bundled tiny-shakespeare (1-2 minutes) and report
#   make test   the whole test suite (CPU: Triton interpreter and the cuTile emulator)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench install clean

demo: $(VENV)/.installed
	$(PY) -m looplm.train configs/shakespeare_demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m pytest --benchmark-only

install: $(VENV)/.installed

# Without an NVIDIA driver, torch is pinned to the CPU build first: an open range would pull the
# newest CUDA build (several GB). With a driver, pip resolves torch from pyproject's range.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==2.13.0"; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) out .pytest_cache .benchmarks
