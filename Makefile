# `make test` and `make demo` bootstrap .venv on a fresh machine: they create it when missing and install
# the package with the exact known-good pins (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DIR ?= runs/demo

.PHONY: test bench-kernels demo clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

bench-kernels: $(STAMP)
	$(PY) bench/kernels.py

# M-GRPO on the embedded default (configs/tiny_cpu.py), from scratch in $(DEMO_DIR).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) launch/train.py --config configs/tiny_cpu.py --workdir $(DEMO_DIR)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis runs
