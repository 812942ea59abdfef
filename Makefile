# make test   fresh machine: creates .venv, installs, runs the test suite (what .ci/run calls)
# make quick  fresh machine: creates .venv, installs, runs the quick scaling study through `mlflow run`
# make ui     browse the runs
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 is a CPU wheel on the reference machine; override for another build, e.g.
# make test TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH  ?= torch==2.13.0
export MLFLOW_DISABLE_TELEMETRY ?= true
# `mlflow run` (like every MLflow client) uses ./mlflow.db unless told otherwise: point it, and
# scaling-suite, at the project's store.
export MLFLOW_TRACKING_URI ?= sqlite:///mlruns/mlflow.db
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: test quick ui doctor clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

quick: $(VENV)/.installed
	mkdir -p mlruns
	mlflow run . -P mode=quick --env-manager local

doctor: $(VENV)/.installed
	scaling-suite doctor

ui: $(VENV)/.installed
	mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1

clean:
	rm -rf $(VENV)
