# Set-up and everyday commands. `make test` and `make demo` work on a fresh clone: they create .venv first.
# The interpreter that creates the venv (resolved now, before the venv's bin/ goes first on PATH below).
PYTHON ?= $(shell command -v python3)
PYTHON := $(PYTHON)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed JIT-compiles a CPU communication op on first use (~90 s); keep that build with this venv so that
# two checkouts never rebuild each other's copy.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
# The venv's own tools first: DeepSpeed's JIT build needs `ninja`, and one ninja version for every process
# (two versions rewrite each other's build log and recompile on every launch).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: test demo lint bench clean slurm-packages

# The extras installed (pyproject.toml): `make demo` needs `demo` (train + finetune + scikit-learn, timm,
# transformers); `make test` needs `test`, which holds every extra (demo's included) and the test tools.
EXTRAS ?= test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	# MosaicML Streaming (a peer row of the loader benchmark) caps numpy, transformers and xxhash below our pins in
	# its metadata but runs with ours: installed without its declared dependencies (the ones it needs are in [bench]).
	if echo ",$(EXTRAS)," | grep -qE ",(test|bench),"; then \
	  $(PY) -m pip install -q --no-deps -c constraints.txt mosaicml-streaming; fi
	touch $(STAMP)

test: $(STAMP) slurm-packages
	$(PY) -m pytest -q --durations=10 tests

# The SLURM lab tests (tests/test_slurm_lab.py) need Debian's slurm-wlm and munge: installed here when running as
# root (CI does); otherwise they skip, and this says so once.
slurm-packages:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing slurm-wlm and munge for the SLURM lab tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null \
	    || echo "SLURM lab tests will be skipped: apt-get install slurm-wlm munge failed"; \
	else echo "SLURM lab tests skipped: as root, run apt-get install -y slurm-wlm munge (make test does it as root)"; fi

demo: $(STAMP)
	$(PY) -m pretrain.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
