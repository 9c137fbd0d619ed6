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

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=10 tests

demo: $(STAMP)
	$(PY) -m pretrain.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache
