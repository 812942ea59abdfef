"""Shared fixtures: every test gets its own token cache and MLflow store; telemetry off."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
# Under pytest-xdist (`make test` runs two workers on this 2-core machine) each worker, and every
# process it starts, trains on one thread: two processes that each use every core slow down 10-80x
# (threads spinning against each other). Set before torch is imported, so its pool starts at 1.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory):
    """One token cache per test session: the stdlib corpus is tokenized once, and a graph compiled
    once (inductor's kernels live under it). Under pytest-xdist the workers share it (the folder
    above each worker's own temporary folder belongs to this session): the cache is safe for
    concurrent builders (data._build, cache.write_json)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "token-cache"
    path.mkdir(exist_ok=True)
    os.environ["SCALING_SUITE_CACHE"] = str(path)
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store; no MLFLOW_RUN_ID leaking in from the environment."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return uri
