# The README's two commands: `make demo` and `make test`.
# Each creates .venv in the repository root if it is missing and installs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= out/demo

# torch: the CPU build, pinned (a plain `torch` would pull a multi-GB CUDA build).
# triton: the version the CUDA build of torch 2.13 requires; its interpreter runs on CPU.
PINS := torch==2.13.0 triton==3.7.1 "deepspeed>=0.19,<0.20"

.PHONY: demo test install bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PINS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/srcid data synth --preset small --out $(DEMO_DIR)/data
	$(VENV)/bin/srcid data check $(DEMO_DIR)/data
	@echo "demo data written to $(DEMO_DIR)/data"

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only

clean:
	rm -rf $(VENV) out .pytest_cache .benchmarks
