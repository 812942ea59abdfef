# make test   fresh machine: creates .venv, installs, runs the test suite (what .ci/run calls)
# make quick  fresh machine: creates .venv, installs, runs the quick scaling study through `mlflow run`
#             (experiment scaling-suite, where `scaling-suite sweep` logs too)
# make ui     browse the runs
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 is a CPU wheel on the reference machine; override for another build, e.g.
# make test TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH  ?= torch==2.13.0
# pytest-xdist workers for `make test`, each training on one thread (tests/conftest.py)
TEST_WORKERS ?= 2
export MLFLOW_DISABLE_TELEMETRY ?= true
# `mlflow run` (like every MLflow client) uses ./mlflow.db unless told otherwise: point it, and
# scaling-suite, at the project's store.
export MLFLOW_TRACKING_URI ?= sqlite:///mlruns/mlflow.db
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: test quick ui doctor clean

# torch through pip (it finds the local CPU wheel; --no-cache-dir keeps no second copy of the wheel on
# disk; its log is printed only when it fails, and a failed install stops here instead of importing a
# half-written torch); the rest through uv, which installs it in about 10 s where pip takes minutes;
# pip again if uv is unavailable. --compile-bytecode writes the .pyc files pip would: without them,
# where PYTHONDONTWRITEBYTECODE is set, every process compiles mlflow, pandas and scipy from source
# (`import mlflow` 4.7 s instead of 2.5 s on 2 cores).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir $(TORCH) > $(VENV)/torch-install.log 2>&1 \
	  || { cat $(VENV)/torch-install.log; echo "make: installing $(TORCH) failed (above)"; exit 1; }
	$(PY) -W ignore -c "import torch"    # installed, before uv could pull a CUDA build (-W: it warns without numpy)
	( $(PY) -m pip install -q uv 2>/dev/null && VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/uv pip install -q --compile-bytecode -e '.[test]' ) \
	  || $(PY) -m pip install -q -e '.[test]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

quick: $(VENV)/.installed
	mkdir -p mlruns
	mlflow run . -P mode=quick --env-manager local --experiment-name scaling-suite

doctor: $(VENV)/.installed
	scaling-suite doctor

ui: $(VENV)/.installed
	mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1

clean:
	rm -rf $(VENV)
