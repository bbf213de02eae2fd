# `make test` and `make demo` bootstrap .venv on a fresh machine: they create it when missing and install
# the package with the exact known-good pins (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DIR ?= runs/demo
REPRO_ROOT ?= runs/repro
WARM_START := $(REPRO_ROOT)/warm_multi/warm_start/summary.json

.PHONY: test bench-kernels demo repro repro-ablations repro-lora repro-dynamic repro-judge repro-delegation clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Tests run in parallel processes (pytest-xdist), one per core up to 4: most of a test's time is single-threaded
# compilation and Python, so two cores run the suite in little more than half the time of one process.
test: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses=4 tests

bench-kernels: $(STAMP)
	$(PY) bench/kernels.py

# M-GRPO co-training of warm-started tiny agents (configs/demo.py) in $(DEMO_DIR), with held-out accuracy
# measured every 10 steps. The warm start (supervised fine-tuning on generated demonstrations) runs first when
# $(REPRO_ROOT) does not have it yet; the comparisons (`make repro`) reuse it, and the compilation cache.
demo: $(STAMP)
	test -f $(WARM_START) || $(PY) launch/warm_start.py --config configs/repro/warm_start.py:multi \
		--workdir $(REPRO_ROOT)/warm_multi
	rm -rf $(DEMO_DIR)
	JAX_COMPILATION_CACHE_DIR=$(REPRO_ROOT)/jax_cache $(PY) launch/train.py --config configs/demo.py:$(REPRO_ROOT) \
		--workdir $(DEMO_DIR)

# The paper's comparisons (configs/repro/), 3 seeds each. `repro`: co_train, main_only and single_agent ->
# docs/results/; `repro-ablations`: alignment off, one shared model and the bottleneck setting ->
# docs/results/ablations/ (it reuses the core runs under $(REPRO_ROOT)); `repro-lora`: co_train training LoRA
# adapters only -> docs/results/lora/; `repro-dynamic`: dynamic sampling in both settings -> docs/results/dynamic/;
# `repro-judge`: a sub-agent judge in the sub-agent's reward, in both settings -> docs/results/judge/;
# `repro-delegation`: a judge of the main agent's delegations in its reward, both settings -> docs/results/delegation/.
# Times: README, "Results".
repro: $(STAMP)
	$(PY) launch/repro.py --root $(REPRO_ROOT) --group core --jobs 2

repro-ablations: $(STAMP)
	$(PY) launch/repro.py --root $(REPRO_ROOT) --group ablations --jobs 2

repro-lora: $(STAMP)
	$(PY) launch/repro.py --root $(REPRO_ROOT) --group lora --jobs 2

repro-dynamic: $(STAMP)
	$(PY) launch/repro.py --root $(REPRO_ROOT) --group dynamic --jobs 2

repro-judge: $(STAMP)
	$(PY) launch/repro.py --root $(REPRO_ROOT) --group judge --jobs 2

repro-delegation: $(STAMP)
	$(PY) launch/repro.py --root $(REPRO_ROOT) --group delegation --jobs 2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis runs
