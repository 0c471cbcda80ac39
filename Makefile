# Two commands do all the set-up on a fresh machine (Python 3.11 on PATH):
#   make demo   installs into .venv, generates the embedded sample dataset and runs the daily flow on it locally
#   make test   installs into .venv and runs the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
WORKDIR ?= workdir
RUNNER ?= --runner=FnApiRunner

# The Airflow environment that runs dags/ (tests/test_airflow_dag.py; never the project's .venv): its own virtualenv,
# named by a hash of its pins, so a change of pins builds a new one and an unchanged one is reused.
AIRFLOW_PINS := dags/requirements-airflow.txt dags/constraints-airflow.txt
AIRFLOW_HASH := $(shell cat $(AIRFLOW_PINS) | sha256sum | cut -c1-12)
AIRFLOW_VENV ?= $(HOME)/.cache/tokenminds/airflow-venv-$(AIRFLOW_HASH)

.PHONY: install demo test bench ablations clean airflow-venv airflow-venv-path airflow-constraints

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

# About 3 to 6 minutes and 2.2 GB on a fresh machine. No prerequisites on purpose: the directory's name holds the pins'
# hash, so an existing one is up to date, whatever the files' timestamps (a fresh clone's are all new).
airflow-venv: $(AIRFLOW_VENV)/.installed

$(AIRFLOW_VENV)/.installed:
	rm -rf $(AIRFLOW_VENV)
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -qq -r dags/requirements-airflow.txt -c dags/constraints-airflow.txt \
	  > $(AIRFLOW_VENV)/install.log 2>&1 || { tail -n 30 $(AIRFLOW_VENV)/install.log; exit 1; }
	$(AIRFLOW_VENV)/bin/airflow version > /dev/null
	touch $@

airflow-venv-path:
	@echo $(AIRFLOW_VENV)

# Re-pin every package of the Airflow environment after a change of dags/requirements-airflow.txt.
airflow-constraints:
	rm -rf $(AIRFLOW_VENV).tmp
	$(PYTHON) -m venv $(AIRFLOW_VENV).tmp
	$(AIRFLOW_VENV).tmp/bin/pip install --quiet -r dags/requirements-airflow.txt
	{ sed -n '1,3p' dags/constraints-airflow.txt; $(AIRFLOW_VENV).tmp/bin/pip freeze | \
	  grep -v -i -E '^(apache-airflow|apache-airflow-providers-apache-beam|apache-airflow-providers-google)=='; } \
	  > dags/constraints-airflow.txt.new && mv dags/constraints-airflow.txt.new dags/constraints-airflow.txt
	rm -rf $(AIRFLOW_VENV).tmp
