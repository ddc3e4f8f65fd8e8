# Two entry points for a fresh machine; each sets up .venv first (once, again when pyproject changes).
#   make demo   train a small LoopGPT on the bundled tiny-shakespeare (1-2 minutes) and report
#   make test   the whole test suite (CPU: Triton interpreter and the cuTile emulator)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench install clean

demo: $(VENV)/.installed
	$(PY) -m looplm.train configs/shakespeare_demo.py --overwrite=True  # the demo replaces its last run

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m pytest --benchmark-only

install: $(VENV)/.installed

# Without an NVIDIA driver (no nvidia-smi), torch 2.13.0 comes first from PyTorch's CPU index: PyPI
# serves the CUDA build on Linux (several GB with its CUDA libraries), and pip prefers the index's
# 2.13.0+cpu over it. Where that index cannot be reached, pip takes torch 2.13.0 from the package
# index it is configured with. With a driver, pip resolves torch from pyproject's range (CUDA build).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_HOST := $(word 2,$(subst /, ,$(TORCH_CPU_INDEX)))

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		if $(PY) -c "import socket; socket.create_connection(('$(TORCH_CPU_HOST)', 443), timeout=5)" 2>/dev/null; \
		then index="--extra-index-url $(TORCH_CPU_INDEX)"; else index=""; fi; \
		$(PY) -m pip install -q "torch==2.13.0" $$index; fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) out .pytest_cache .benchmarks
