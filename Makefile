# Two commands do all the set-up on a fresh machine (Python 3.11 on PATH):
#   make demo   installs into .venv, generates the embedded sample dataset and runs the daily flow on it locally
#   make test   installs into .venv and runs the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
WORKDIR ?= workdir
RUNNER ?= --runner=FnApiRunner

.PHONY: install demo test bench ablations clean

install: $(INSTALLED)

$(INSTALLED): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(INSTALLED)

demo: $(INSTALLED)
	WORKDIR=$(WORKDIR) PY=$(PY) bash scripts/daily_demo.sh

test: $(INSTALLED)
	$(PY) -m pytest -q tests

bench: $(INSTALLED)
	$(PY) -m bench.run_all

# The paper's Table 1 directions (full model vs K=1, next-watch, full-depth SIDs, no searches) on a generated sample;
# DATASET=movielens for MovieLens-1M after scripts/run_movielens.sh. About an hour on 2 cores.
ablations: $(INSTALLED)
	PY=$(abspath $(PY)) WORK=$(WORKDIR)/ablations bash scripts/run_ablations.sh

clean:
	rm -rf $(WORKDIR)
