"""Optuna allocation search and its workers: two workers on one study, a worker killed mid-trial,
PostgreSQL, a resumed search, the parabola fit, and one-line errors for bad input."""

import glob
import json
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from scaling_suite import rdb, worker
from scaling_suite.cli import main
from scaling_suite.config import make_config
from analysis.minimum import profile_minimum
from scaling_suite.space import Space

# Smoke scale: N 7k-54k (depth 1-2), context 32, 4-24 steps of 512 tokens: about a second per trial.
SMOKE = ["--context", "32", "--batch_tokens", "512", "--eval_tokens", "1024", "--head_dim", "8", "--device", "cpu",
         "--precision", "fp32", "--eval_every", "1000", "--checkpoint_every", "1000", "--min_tpp", "0.01",
         "--min_steps", "4"]
STUDY = "{}-C=6e+08"
FAST = ["--heartbeat", "1", "--grace", "4", "--quiet", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """`optimize --threads 1` sets this process's torch threads; give the other tests theirs back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _optimize(storage, study, trials, *extra):
    return ["optimize", "--flops", "6e8", "--trials", str(trials), "--sampler_seed", "0", "--storage", storage, "--study", study,
            *FAST, *SMOKE, *extra]


def _load(storage, name):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def _children(parent_run_id):
    from scaling_suite import tracking

    client = tracking.init_store()
    exp = client.get_run(parent_run_id).info.experiment_id
    return client, client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def _check_search(storage, name, n):
    """n COMPLETE trials, n FINISHED children, trial <-> run pointers, no configuration twice."""
    from optuna.trial import TrialState

    study = _load(storage, name)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == n
    assert len({t.user_attrs["config_key"] for t in done}) == n
    parent = study.user_attrs[rdb.ATTR]["mlflow_parent_run_id"]
    client, runs = _children(parent)
    assert len(runs) == n and {r.info.status for r in runs} == {"FINISHED"}
    assert len({json.dumps(r.data.params, sort_keys=True) for r in runs}) == n   # trained once each
    by_id = {r.info.run_id: r for r in runs}
    for t in done:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna_trial"] == str(t.number)
        assert run.data.metrics["final_val_loss"] == pytest.approx(t.value)
    return study, done, client, parent


def _two_workers(storage, name, then):
    """Create the study here, let two worker processes train its 5 trials, then run THEN here."""
    assert main(_optimize(storage, name, 5, "--create_only")) == 0
    procs = worker.spawn_workers(storage, STUDY.format(name), 2)
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    _, done, _, _ = _check_search(storage, STUDY.format(name), 5)
    assert len({t.user_attrs["worker"] for t in done}) == 2          # both workers trained trials
    assert main(_optimize(storage, name, *then)) == 0
    study, done, client, parent = _check_search(storage, STUDY.format(name), then[0])
    run = client.get_run(parent)
    assert run.data.metrics["N_opt"] > 0 and run.data.tags["fit_status"]
    assert "plots/loss_vs_N.png" in [f.path for f in client.list_artifacts(parent, "plots")]
    return done


def test_two_workers_share_one_sqlite_study_which_then_resumes(mlflow_store, token_cache, tmp_path):
    # Then this process resumes the same study with a 6th trial (a new `optimize` run adopts the
    # search run) and fits the optimum. (6 sizes at C=6e8: one-layer shapes stop below the smallest
    # two-layer one, space.shape_table.)
    done = _two_workers(f"sqlite:///{tmp_path}/mlruns/optuna.db", "two", [6, "--workers", "1"])
    assert sum(t.user_attrs.get("grid_point", False) for t in done) == 4   # the coarse grid, then the GP
    assert all("log10_N" in t.params for t in done)


def test_workers_give_each_run_the_studys_finished_runs_of_its_schedule(mlflow_store):
    """worker.study_reference: the parent's FINISHED training children of the run's schedule, its own
    configuration left out, so train's final-loss prediction is the study predictor's."""
    from scaling_suite import tracking
    from scaling_suite.config import make_config

    client = tracking.init_store()
    exp = client.create_experiment("ref")
    parent = client.create_run(exp).info.run_id
    cfgs = [make_config(preset="tiny", D=D) for D in (1e5, 2e5, 4e5)] + [make_config(preset="tiny", D=3e5, schedule="wsd")]
    for cfg in cfgs:
        d = cfg.derived()
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "role": "train"}).info.run_id
        for k, v in cfg.to_params().items():
            client.log_param(run, k, v)
        for j in range(1, 5):
            client.log_metric(run, "val_loss", 3.0 - 0.2 * j, step=int(d.D * j / 4))
        for k, v in {"final_val_loss": 2.2, "N": d.N, "D": d.D}.items():
            client.log_metric(run, k, v)
        client.set_terminated(run, "FINISHED")
    cache = {}
    assert len(worker.study_reference(client, parent, cfgs[0], cache)) == 2        # the other two cosine runs
    assert len(worker.study_reference(client, parent, make_config(preset="tiny", D=8e5), cache)) == 3
    assert len(worker.study_reference(client, parent, make_config(preset="tiny", D=8e5, schedule="wsd"), cache)) == 1
    assert len(cache) == 4                                                          # each run read once


def test_killed_worker_trial_is_retried_elsewhere_and_resumed(mlflow_store, token_cache, tmp_path):
    """A queued sweep split across two workers; the one training the long run is SIGKILLed."""
    from optuna.trial import TrialState

    from scaling_suite import tracking

    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    base = dict(context=32, batch_tokens=512, eval_tokens=1024, head_dim=8, device="cpu", precision="fp32",
                eval_every=1000)
    long = make_config(**base, depth=1, aspect=16, D=200 * 512, checkpoint_every=10)
    short = [make_config(**base, depth=d, D=20 * 512) for d in (1, 2)]
    parent = tracking.start_run(run_name="queued sweep", tags={"role": "study"}, system_metrics=False)
    assert worker.enqueue_configs(storage, "queue", [long, *short], parent.run_id, heartbeat=1, grace=4) == 3
    assert worker.enqueue_configs(storage, "queue", [long], parent.run_id) == 0          # idempotent
    procs = worker.spawn_workers(storage, "queue", 2)
    client, study = tracking.init_store(), _load(storage, "queue")
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline:     # wait until the long run has a checkpoint
        t = study.trials[0]
        run_id = _child_of_trial(client, parent.run_id, 0)
        if t is not None and t.state == TrialState.RUNNING and run_id and \
                client.list_artifacts(run_id, "checkpoints"):
            victim = int(t.user_attrs["worker"].rsplit(":", 1)[1])
        time.sleep(0.2)
    assert victim, "the long trial never checkpointed"
    os.kill(victim, signal.SIGKILL)
    killed_at = (client.get_run(run_id).info.status, time.time())
    [p.wait(timeout=240) for p in procs]
    study = _load(storage, "queue")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed"] is True, (retry, killed_at)
    assert retry.user_attrs["worker"] != f"{socket.gethostname()}:{victim}"
    _, runs = _children(parent.run_id)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}   # the killed run resumed, not redone
    assert retry.user_attrs["mlflow_run_id"] == run_id
    assert client.get_run(run_id).data.tags["optuna_trial"] == str(retry.number)


def test_unexpected_error_in_a_trial_is_retried(mlflow_store, token_cache, tmp_path, monkeypatch):
    """A store hiccup inside a trial: the worker queues it again and goes on (in this process)."""
    from optuna.trial import TrialState

    from scaling_suite import sweep, tracking

    real, calls = sweep.run_child, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("tracking server unreachable")
        return real(*a, **kw)

    monkeypatch.setattr(sweep, "run_child", flaky)
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    cfg = make_config(context=32, batch_tokens=512, eval_tokens=1024, head_dim=8, device="cpu", precision="fp32",
                      eval_every=1000, depth=1, D=4 * 512)
    parent = tracking.start_run(run_name="queued sweep", system_metrics=False)
    worker.enqueue_configs(storage, "q", [cfg], parent.run_id)
    assert worker.work(storage, "q", progress=False) == 2
    states = [t.state for t in _load(storage, "q").trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    _, runs = _children(parent.run_id)
    assert [r.info.status for r in runs] == ["FINISHED"]


def _child_of_trial(client, parent_run_id, number):
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.optuna_trial = '{number}'")
    return runs[0].info.run_id if runs else None


def _postgres_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")] if shutil.which("initdb") else [])
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (skipped without the server binaries or psycopg)."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries absent (apt-get install -y postgresql)")
    pytest.importorskip("psycopg", reason="psycopg absent (pip install 'scaling-suite[postgres]')")
    as_user = []
    root = Path(tempfile.mkdtemp(prefix="scaling-suite-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True)  # noqa: E731
    run(bindir / "initdb", "-D", root / "data", "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    run(bindir / "pg_ctl", "-D", root / "data", "-l", root / "log", "-w", "-o",
        f"-p {port} -h 127.0.0.1 -k {root} -F", "start")
    try:
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(mlflow_store, token_cache, postgres_url):
    # Then this process only waits for the trials (none left) and fits the optimum.
    _two_workers(postgres_url, "pg", [5, "--workers", "0"])


def test_parabola_finds_a_known_vertex():
    import numpy as np

    N = np.logspace(4, 6, 9)
    loss = 2.0 + 0.3 * (np.log10(N) - 5.2) ** 2 + np.random.default_rng(0).normal(0, 1e-3, N.size)
    fit = profile_minimum(N, loss, decades=1.0)
    assert fit["status"] == "ok" and fit["x_opt"] == pytest.approx(10 ** 5.2, rel=0.03)
    assert fit["x_lo"] < 10 ** 5.2 < fit["x_hi"] and fit["loss_opt"] == pytest.approx(2.0, abs=0.01)
    # The best of the first three sizes is the largest: unbracketed, said so, the best run stands.
    edge = profile_minimum(N[:3], loss[:3])
    assert edge["status"] == "unbracketed" and "largest size tried" in edge["reason"]
    assert edge["x_opt"] == N[2]


def test_allocation_exponents_over_budgets():
    """Three synthetic budgets with N_opt ∝ C^0.5: the analysis package recovers a and b = 1 - a."""
    import numpy as np

    from scaling_suite.optimize import fit_allocation

    summaries = []
    for C in (1e12, 1e13, 1e14):
        N = np.logspace(-0.6, 0.6, 7) * 0.1 * C ** 0.5
        D = C / (6 * N)
        loss = 2 + 0.2 * np.log10(N / (0.1 * C ** 0.5)) ** 2
        rows = [{"N": n, "D": d, "C": C, "final_val_loss": l} for n, d, l in zip(N, D, loss)]
        summaries.append({"C": C, "trials": rows, "fit": profile_minimum(N, loss, decades=1.0)})
    out = fit_allocation(summaries, window=1.0)
    assert out["a"] == pytest.approx(0.5, abs=1e-6) and out["b"] == pytest.approx(0.5, abs=1e-6)


def test_space_is_log_spaced_and_bounded():
    space = Space(make_config(C=1e18), 1e13)
    Ns = [s.N for s in space.shapes]
    gaps = sorted(b / a for a, b in zip(Ns, Ns[1:]))
    # the depth dial alone: 2.7x. The widest gap, 1.94x, is 35k -> 68k: two layers at widths 32 and
    # 48 (head_dim 16), with no one-layer shape between them any more (shape_table)
    assert Ns == sorted(Ns) and gaps[-1] < 2.0 and gaps[len(gaps) // 2] < 1.15
    grid = space.grid(4)
    assert len(grid) == 4 and grid[0] == space.shapes[0] and grid[-1] == space.shapes[-1]
    # --tune lr beta2: a trial also picks them; the size is the table's nearest to its log10_N
    import optuna

    tuned = Space(make_config(C=1e18), 1e13, tune=("lr", "beta2"))
    x, extra = tuned.suggest(optuna.trial.FixedTrial({"log10_N": 5.0, "lr": 1e-3, "beta2": 0.99}))
    cfg = tuned.config(tuned.nearest(x)[0], **extra)
    assert (cfg.lr, cfg.beta2, cfg.C) == (1e-3, 0.99, 1e13) and abs(math.log10(cfg.derived().N) - 5) < 0.05


@pytest.mark.parametrize("argv, message", [
    (["optimize", "--flops", "1e13", "--storage", "not a url"], "is not a database URL"),
    (["optimize", "--flops", "1e13", "--storage", "nosuchdb://x"], "cannot open the Optuna storage"),
    (["optimize", "--flops", "1e6"], "too small for this search: the smallest model"),
    (["optimize", "--flops", "lots"], "--flops takes numbers"),
    (["optimize", "--flops", "1e13", "--depth", "3"], "optimize sets depth itself"),
    (["optimize", "--flops", "1e13", "--sampler", "cma"], "unknown --sampler"),
    (["worker", "--study", "nope"], "no study 'nope'"),
    (["optimize", "--flops", "6e8", "--trials", "7", *SMOKE], "--trials 7 is more than the 6 sizes"),
])
def test_bad_input_is_one_line(argv, message, mlflow_store, capsys, tmp_path):
    if argv[0] == "worker":
        argv = [*argv, "--storage", f"sqlite:///{tmp_path}/optuna.db"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_one_layer_shapes_stop_below_the_smallest_two_layer_one():
    """Kaplan et al. 2020 §3.1: one-layer models sit off the trend; here the wide ones (13.1k, 21.6k
    at quick's base) sat 0.01-0.06 nats above their budgets' fits. Below the smallest two-layer shape
    of two heads a one-layer model is the only choice, and stays (the ladder's floor)."""
    from scaling_suite import adaptive
    from scaling_suite.space import shape_table

    for mode in ("quick", "dev", "full"):
        base = adaptive.base_config(mode, {})
        table = shape_table(base, 2.0, 3e6)
        two = min(s.N for s in table if s.depth == 2 and s.d_model >= 2 * base.head_dim)
        assert [s for s in table if s.depth == 1 and s.N >= two] == []
        assert any(s.depth == 1 and s.d_model >= 2 * base.head_dim for s in table)   # smallest_sensible's
    quick = [(s.N, s.depth) for s in shape_table(adaptive.base_config("quick", {}), 2.0, 3e4)]
    assert quick == [(3096, 1), (7472, 1), (10832, 2), (20088, 2), (27048, 3)]


def test_study_spec_round_trips_through_user_attrs():
    """The study's contract between its creator and the workers: typed, and stored as the flat dict
    that studies made before the class hold (so they still load)."""
    from scaling_suite.worker import StudySpec

    space = Space(make_config(C=1e18), 1e13)
    alloc = StudySpec("allocation", "optuna:x", 20, 90, "run1", 12, "grid+gp", 4, 0, "sqlite:///m.db", space.to_spec())
    queue = StudySpec("queue", "optuna:q", 20, 90, "run2")
    for spec in (alloc, queue):
        stored = json.loads(json.dumps(spec.to_attrs()))
        assert StudySpec.from_attrs(stored) == spec
    flat = alloc.to_attrs()
    assert flat["C"] == 1e13 and flat["kind"] == "allocation" and "space" not in flat
    assert Space.from_spec(StudySpec.from_attrs(flat).space).shapes == space.shapes
