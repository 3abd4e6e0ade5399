# The README's two commands: `make demo` and `make test`.
# Each creates .venv in the repository root if it is missing and installs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= out/demo
DEMO_EPOCHS ?= 10

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

# The demo: synthetic data (small preset), validated; SRCID trained by 2 CPU processes through
# the DeepSpeed launcher; every downstream task evaluated and printed as the paper's tables.
demo: $(STAMP)
	$(VENV)/bin/srcid data synth --preset small --out $(DEMO_DIR)/data --overwrite
	$(VENV)/bin/srcid data check $(DEMO_DIR)/data
	rm -rf $(DEMO_DIR)/run
	DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --num_gpus 2 launcher/train.py --model srcid --preset small \
		--data $(DEMO_DIR)/data/pretrain --out $(DEMO_DIR)/run --epochs $(DEMO_EPOCHS)
	$(VENV)/bin/srcid eval --run $(DEMO_DIR)/run --data $(DEMO_DIR)/data --task all --seeds 1
	@echo "data: $(DEMO_DIR)/data"
	@echo "run directory: $(DEMO_DIR)/run (metrics.png, metrics.csv, tensorboard/, checkpoints/, model.safetensors)"

test: $(STAMP)
	$(PY) -m pytest tests -q -n auto --dist loadfile

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only

# On a GPU machine, with its own python3 (CUDA build of torch, triton; no .venv is made): versions,
# offline wheels from .whl/, compile check, kernel tests on CUDA, bench/kernel_table.py and a short
# paper-preset training run, logged into $OUT (else out/device_check). docs/KERNELS.md, "Benchmarks".
.PHONY: device-check
device-check:
	PYTHON=$(PYTHON) bash bench/device_check.sh

clean:
	rm -rf $(VENV) out .pytest_cache .benchmarks
