"""Processes started together on one store (issue 15): the store is created once, and a
configuration is trained once, however many processes run the same study.

Each subprocess uses one thread (two torch processes at full threads on 2 cores slow down
10-80x, measured on a 2-core machine)."""

import json
import os
import subprocess
import sys
import time
from collections import Counter

import mlflow
import pytest

from scaling_suite import plan as plan_lib

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}

# Imports first, then all processes open the fresh store at the same moment (a file appears).
OPEN_AT_ONCE = """
import os, sys, time
from pathlib import Path
from mlflow import MlflowClient  # noqa: F401 — imported before the start line
from scaling_suite import tracking
go = Path(sys.argv[1])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.005)
t = tracking.start_run("race", run_name=f"p{os.getpid()}", system_metrics=False)
t.log_metrics({"x": 1.0}, step=0)
t.finish()
"""


@pytest.mark.parametrize("n", [2, 4])
def test_processes_opening_a_fresh_store_at_once_all_succeed(n, tmp_path, monkeypatch):
    """a7e3e38: 'table registered_models already exists', alembic 'expected to match one row',
    left-over _alembic_tmp_ tables; the store then refused every command."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(go)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    deadline = time.time() + 120    # the imports (mlflow: seconds each on 2 cores), then all at once
    while len(list(tmp_path.glob("ready-*"))) < n and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    assert [p.returncode for p, _, _ in results] == [0] * n, [e[-1500:] for _, _, e in results]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == n and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_sweeps_of_one_study_train_each_configuration_once(n, tmp_path, token_cache):
    """a7e3e38: one configuration trained twice (two FINISHED children), and two processes trained
    into the same run (every metric point twice); both said '(0 from earlier)'."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": uri, "SCALING_SUITE_CACHE": str(token_cache)}
    env.pop("MLFLOW_RUN_ID", None)
    subprocess.run([sys.executable, "-c", "from scaling_suite import tracking; tracking.init_store()"], env=env,
                   cwd=tmp_path, check=True)   # the store exists: this test is about the claims
    cmd = [sys.executable, "-m", "scaling_suite.cli", "sweep", "--mode", "smoke", "--experiment", "c",
           "--quiet", "--no_analysis"]
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    assert [p.returncode for p, _, _ in results] == [0] * n, [e[-1500:] for _, _, e in results]
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("c").experiment_id
    train_runs = client.search_runs([exp], "tags.role = 'train'")
    finished = Counter(json.dumps(r.data.params, sort_keys=True) for r in train_runs if r.info.status == "FINISHED")
    assert len(finished) == len(plan_lib.make_plan("smoke").points)
    assert max(finished.values()) == 1, "a configuration was trained twice"
    assert len(train_runs) == len(finished)
    for r in train_runs:
        for key in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), f"run {r.info.run_id} has {key} points twice"
    assert len(client.search_runs([exp], "tags.role = 'study'")) == 1
    trained_here = [out for _, out, _ in results if "(0 from earlier)" in out]
    assert len(trained_here) == 1, [out[-300:] for _, out, _ in results]
