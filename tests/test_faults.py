"""Runs and files under faults (issue 15): forged checkpoints, resume, run status, scratch copies,
one-line errors, Ctrl-C, an unreachable server, and concurrent processes on one store.

Each test fails on a7e3e38's behaviour: the defect it covers is named in its docstring."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from scaling_suite import cli, config, tracking
from scaling_suite import train as train_lib
from scaling_suite.config import PRESETS, RunConfig, from_preset, make_config
from scaling_suite.earlystop import Prediction
from scaling_suite.errors import SuiteError
from scaling_suite.checkpoint import config_from_params, load_checkpoint, save_checkpoint

FAST = ["--preset", "tiny", "--D", "40960", "--eval_every", "2", "--quiet"]
# Subprocesses share 2 cores: one thread each, or they slow each other 10-80x (measured here).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def run_cli(argv, capsys):
    capsys.readouterr()     # what the test itself printed before (MLflow creating its store)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


class Forged:
    """Unpickling it calls open(PATH, "w"): creates an empty marker file, nothing else."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny_state(tmp_path, cfg, run_id="run-a") -> Path:
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    path = tmp_path / "last.pt"
    preds = [Prediction(100, np.float64(2.5), np.float64(2.4), np.float64(2.6))]   # earlystop gives numpy floats
    save_checkpoint(path, model, opt, 3, cfg, [(0, 5.0), (4096, 4.0)], [5.0, 4.5, 4.0], preds, 0, run_id)
    return path


# --- 1. checkpoints run no code, and only a run's own is loaded --------------------------------------

def test_forged_checkpoint_runs_no_code(tmp_path):
    """a7e3e38 loaded checkpoints with weights_only=False: the forged file created its marker."""
    probe = tmp_path / "payload-works"
    pickle.loads(pickle.dumps(Forged(probe)))          # the payload does what it says when unpickled
    assert probe.exists()
    cfg = make_config(depth=1, D=8192.0)
    marker = tmp_path / "marker"
    for name, write in (("zip.pt", lambda p: torch.save({"model": Forged(marker), "config": cfg.to_params()}, p)),
                        ("raw.pt", lambda p: p.write_bytes(pickle.dumps({"model": Forged(marker)})))):
        path = tmp_path / name
        write(path)
        with pytest.raises(SuiteError) as e:
            load_checkpoint(path, cfg)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert not marker.exists(), f"loading {name} ran code"


def test_checkpoint_holds_plain_values_and_names_its_run(tmp_path):
    cfg = make_config(depth=1, D=8192.0)
    path = tiny_state(tmp_path, cfg, "run-a")
    state = torch.load(path, weights_only=True)        # no numpy scalars, no custom classes
    assert state["run_id"] == "run-a" and state["predictions"][0]["final_loss"] == 2.5
    assert load_checkpoint(path, cfg, run_id="run-a")["step"] == 3
    with pytest.raises(SuiteError, match="belongs to run run-a, not run-b"):
        load_checkpoint(path, cfg, run_id="run-b")
    with pytest.raises(SuiteError, match="different config"):
        load_checkpoint(path, cfg.replace(lr=1e-4), run_id="run-a")


def test_checkpoint_without_its_config_is_one_line(tmp_path):
    """a7e3e38: KeyError: 'config'."""
    cfg = make_config(depth=1, D=8192.0)
    state = torch.load(tiny_state(tmp_path, cfg), weights_only=True)
    del state["config"]
    torch.save(state, tmp_path / "noconf.pt")
    with pytest.raises(SuiteError, match="lacks config"):
        load_checkpoint(tmp_path / "noconf.pt", cfg)


def killed_run(client, cfg, reason="interrupted by the user"):
    exp = client.create_experiment("k")
    run = client.create_run(exp, tags={"failure_reason": reason})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in cfg.to_params().items()])
    client.set_terminated(run.info.run_id, "KILLED")
    return run.info.run_id


def test_resume_from_a_forged_store_checkpoint_is_refused_and_changes_nothing(mlflow_store, token_cache, tmp_path,
                                                                            capsys):
    """a7e3e38 ran the forged checkpoint's code on `train --resume` and marked the run FAILED."""
    client = mlflow.MlflowClient(mlflow_store)
    cfg = from_preset("tiny", D=40960.0)
    run_id = killed_run(client, cfg)
    marker = tmp_path / "marker"
    forged = tmp_path / "forged" / "last.pt"
    forged.parent.mkdir()
    torch.save({"model": Forged(marker), "config": cfg.to_params()}, forged)
    client.log_artifact(run_id, str(forged), "checkpoints")
    code, _, err = run_cli(["train", "--resume", run_id, "--quiet"], capsys)
    assert code == 2 and "refused" in one_line(err)
    assert not marker.exists()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted by the user"


# --- 2. config round trip, and --resume ----------------------------------------------------------------

def random_config(rng: random.Random) -> RunConfig:
    """A random valid RunConfig, its numbers typed as int or float at random (as presets and code do)."""
    while True:
        context = rng.choice([16, 32, 64, 128])
        budget = rng.choice(["D", "C", "tokens_per_param"])
        value = {"D": rng.choice([1_000_000, 2e6, 1234567.0, 10 ** rng.randint(5, 9)]),
                 "C": rng.choice([1e12, 3e13, 10 ** rng.randint(11, 15)]),
                 "tokens_per_param": rng.choice([20, 20.0, 7.5, rng.uniform(1, 100)])}[budget]
        kw = dict(depth=rng.randint(1, 12), aspect=rng.choice([16, 32, 48]), head_dim=rng.choice([8, 16, 32]),
                  context=context, batch_tokens=context * rng.choice([8, 32, 64]), lr=10 ** rng.uniform(-4, -1),
                  beta2=rng.choice([0.95, 0.99, 0.999]), weight_decay=rng.choice([0, 0.1, 0.0]),
                  warmup_tokens=rng.choice([-1, -1.0, 0, 4096.0]), schedule=rng.choice(config.SCHEDULES),
                  cooldown_frac=rng.choice([0.2, 0.1]), eval_every=rng.randint(0, 50), eval_tokens=4096,
                  early_stop=rng.choice([True, False]), predict_from=rng.choice([0.25, 0.5]),
                  precision=rng.choice(config.PRECISIONS), compile=rng.choice(config.COMPILES),
                  seed=rng.randint(0, 10 ** 6), preset=rng.choice(["", "tiny"]), **{budget: value})
        if rng.random() < 0.3:
            kw.update(parametrization="mup", mup_base_width=rng.choice([32, 64]))
        try:
            return make_config(**kw)
        except SuiteError:
            continue    # e.g. a budget under one global batch


def test_config_round_trips_through_mlflow_params(mlflow_store):
    """a7e3e38: a preset's D=1_000_000 came back as "1000000.0" and the resumed run's checkpoint was
    refused as 'a different config'. For every preset and 300 random configs: rebuilt from the
    params MLflow gives back, the config equals the one logged, and its checkpoint loads."""
    rng = random.Random(15)
    configs = [from_preset(p) for p in PRESETS] + [random_config(rng) for _ in range(300)]
    assert {type(c.D) for c in configs} == {int, float}          # both spellings are exercised
    client = mlflow.MlflowClient(mlflow_store)
    exp = client.create_experiment("params")
    for i, cfg in enumerate(configs):
        if i < len(PRESETS) + 20:   # through a real store for some (MLflow keeps strings as given) ...
            run = client.create_run(exp)
            client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in cfg.to_params().items()])
            params = client.get_run(run.info.run_id).data.params
        else:                       # ... and as strings for the rest
            params = cfg.to_params()
        rebuilt = config_from_params(params)
        assert rebuilt == cfg, cfg
        assert config_from_params(rebuilt.to_params()) == cfg
    made = tiny_state(Path(os.getcwd()), from_preset("tiny"), "r")
    assert load_checkpoint(made, config_from_params(from_preset("tiny").to_params()), run_id="r")["step"] == 3


def test_readme_resume_demo_then_finished_run_is_left_alone(mlflow_store, token_cache, capsys, monkeypatch):
    """The README demo: `train --preset tiny`, interrupt, `--resume RUN_ID`. a7e3e38 marked the run
    FAILED (config mismatch); a resume of a FINISHED run logged duplicate points and overwrote
    wall_seconds; `--resume ID --depth 4` ignored --depth. The preset's own int D is kept, at 10 steps."""
    monkeypatch.setitem(PRESETS["tiny"], "D", 40_960)
    monkeypatch.delenv("TQDM_DISABLE")      # MLflow's download bar would print: --quiet must silence it
    real, calls = train_lib.evaluate, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 6:                 # after the checkpoint at step 4
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train_lib, "evaluate", interrupted)
    code, _, err = run_cli(["train", "--preset", "tiny", "--quiet"], capsys)
    assert code == 130 and "interrupted" in one_line(err)
    client = mlflow.MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("scaling-suite").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "KILLED" and run.data.params["D"] == "40960"
    monkeypatch.setattr(train_lib, "evaluate", real)

    code, _, err = run_cli(["train", "--resume", run_id, "--depth", "4"], capsys)
    assert code == 2 and "drop --depth" in one_line(err)
    assert client.get_run(run_id).info.status == "KILLED"

    code, out, err = run_cli(["train", "--resume", run_id, "--quiet"], capsys)
    assert code == 0, err
    assert "Downloading artifacts" not in err
    done = client.get_run(run_id)
    assert done.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert len(steps) == len(set(steps)) and steps[-1] == 40960

    before = {k: len(client.get_metric_history(run_id, k)) for k in done.data.metrics}
    code, _, err = run_cli(["train", "--resume", run_id, "--quiet"], capsys)
    assert code == 2 and "FINISHED" in one_line(err)
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.data.metrics == done.data.metrics
    assert {k: len(client.get_metric_history(run_id, k)) for k in done.data.metrics} == before


# --- 3. status discipline --------------------------------------------------------------------------------

def test_stale_mlflow_run_id_of_a_finished_run_is_refused(mlflow_store, token_cache, capsys, monkeypatch):
    """a7e3e38 attached to it anyway and, on the refusal that followed, turned it FAILED."""
    client = mlflow.MlflowClient(mlflow_store)
    exp = client.create_experiment("stale")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "final_val_loss", 3.0)
    client.set_terminated(run.info.run_id, "FINISHED")
    before = client.get_run(run.info.run_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    code, _, err = run_cli(["train", *FAST], capsys)
    assert code == 2 and "MLFLOW_RUN_ID" in one_line(err)
    again = client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED" and again.info.end_time == before.info.end_time
    assert len(client.search_runs([exp])) == 1 and "failure_reason" not in again.data.tags


def test_resume_of_a_killed_run_without_checkpoint_changes_nothing(mlflow_store, token_cache, capsys):
    """a7e3e38 rewrote KILLED to FAILED and replaced its failure_reason."""
    client = mlflow.MlflowClient(mlflow_store)
    run_id = killed_run(client, from_preset("tiny", D=40960.0), "killed by the test")
    code, _, err = run_cli(["train", "--resume", run_id, "--quiet"], capsys)
    assert code == 2 and "no checkpoint" in one_line(err)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "killed by the test"


def test_null_tracker_has_the_whole_interface():
    null, real = tracking.NullTracker, tracking.MlflowTracker
    public = {n for n in dir(real) if not n.startswith("_") and callable(getattr(real, n))}
    assert public <= {n for n in dir(null) if callable(getattr(null, n))}
    with pytest.raises(ValueError), null().running():
        raise ValueError("the error goes on")


# --- 4. scratch copies --------------------------------------------------------------------------------

def test_no_scratch_copy_is_left_after_a_run_or_a_failed_run(mlflow_store, token_cache, capsys, monkeypatch, tmp_path):
    """a7e3e38 left every run's checkpoint copy in /tmp (store.scratch_dir)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    code, _, err = run_cli(["train", *FAST], capsys)
    assert code == 0, err
    code, _, err = run_cli(["train", *FAST, "--lr", "1e6", "--grad_clip", "0", "--warmup_tokens", "0"], capsys)
    assert code == 2 and "diverged" in one_line(err)
    assert list(scratch.iterdir()) == []


# --- 5. one line per fault ------------------------------------------------------------------------------

def test_disk_full_checkpoint_write_says_so(tmp_path, token_cache):
    """a7e3e38: RuntimeError 'file write failed' traceback, the disk never named. /dev/full answers
    every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    (tmp_path / "last.tmp").symlink_to("/dev/full")    # where save_checkpoint writes before its rename
    cfg = make_config(depth=1, context=32, batch_tokens=1024, D=8 * 1024, eval_tokens=2048, eval_every=4,
                      checkpoint_every=4, precision="fp32", device="cpu")
    with pytest.raises(SuiteError, match="disk full") as e:
        train_lib.train(cfg, checkpoint_dir=tmp_path, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "last.pt").exists()


def test_store_deleted_mid_run_is_one_line(mlflow_store, token_cache, capsys, monkeypatch, tmp_path):
    """a7e3e38: 1,467 lines of traceback."""
    import shutil
    real, calls = train_lib.evaluate, []

    def deletes_the_store(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            shutil.rmtree(tmp_path / "mlruns")
        return real(*a, **kw)

    monkeypatch.setattr(train_lib, "evaluate", deletes_the_store)
    code, _, err = run_cli(["train", *FAST], capsys)
    assert code == 2 and "MLflow store" in one_line(err)


def test_database_urls_without_their_driver_are_one_line(mlflow_store, capsys, monkeypatch):
    """a7e3e38 caught ModuleNotFoundError; Optuna re-raises a missing driver as a plain ImportError."""
    try:
        import psycopg2  # noqa: F401
        pytest.skip("psycopg2 is installed here")
    except ImportError:
        pass
    url = "postgresql+psycopg2://user:s3cret@127.0.0.1:1/db"
    code, _, err = run_cli(["optimize", "--flops", "1e12", "--storage", url, "--quiet"], capsys)
    assert code == 2 and "psycopg2" in one_line(err) and "s3cret" not in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    code, _, err = run_cli(["train", *FAST], capsys)
    assert code == 2 and "psycopg2" in one_line(err) and "s3cret" not in err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_is_one_line_exit_128_plus_signal_and_the_run_is_killed(sig, code, mlflow_store,
                                                                                   token_cache, tmp_path):
    """a7e3e38 marked the run KILLED on Ctrl-C but printed 22-28 lines of KeyboardInterrupt and exited 1;
    on SIGTERM (a scheduler's stop, `kill`) the process died at once and the run stayed RUNNING."""
    env = {**os.environ, **ONE_THREAD, "MLFLOW_TRACKING_URI": mlflow_store}
    # The store is created here, before the child starts: this process polls it, and a client opening a
    # fresh SQLite store migrates its schema, unlocked, while the child migrates it under the suite's
    # lock (CI, 2026-12-01: the child failed with "no such column: spans.dimension_attributes").
    tracking.init_store(mlflow_store)
    # 1e8 tokens: minutes of training on any CPU, so the interrupt always finds it running. 1M, then
    # 4M, ended first on faster machines (CI, 2026-11-30): the first val_loss waits for the 15 s flush.
    proc = subprocess.Popen([sys.executable, "-m", "scaling_suite.cli", "train", "--preset", "tiny", "--D", "1e8",
                             "--quiet"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = mlflow.MlflowClient(mlflow_store)
    run_id, deadline = None, time.time() + 180
    while time.time() < deadline and proc.poll() is None and run_id is None:
        time.sleep(0.5)
        exp = client.get_experiment_by_name("scaling-suite") if os.path.exists(tmp_path / "mlruns") else None
        if exp:
            runs = [r for r in client.search_runs([exp.experiment_id]) if "val_loss" in r.data.metrics]
            run_id = runs[0].info.run_id if runs else None
    if run_id is None:
        ended = proc.poll()
        proc.kill()
        out, err = proc.communicate()
        why = f"the run ended first (exit {ended})" if ended is not None else "none within 180 s"
        pytest.fail(f"no val_loss to interrupt at: {why}: {err[-1500:]}")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-1500:]
    assert one_line(err).startswith("interrupted")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["failure_reason"]


# --- 8. an unreachable tracking server --------------------------------------------------------------------

def test_unreachable_tracking_server_fails_in_one_line_quickly(token_cache, tmp_path):
    """a7e3e38 retried in silence for about 4 minutes (MLflow's 7 retries with backoff). The
    subprocess limit is a hang guard, not a speed measurement: expected is ~2 s for a refused port."""
    env = {**os.environ, **ONE_THREAD, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}   # discard port, loopback
    out = subprocess.run([sys.executable, "-m", "scaling_suite.cli", "train", "--preset", "tiny", "--quiet"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "does not answer" in one_line(out.stderr)


def test_a_failed_flush_loses_no_points(mlflow_store, monkeypatch):
    client = tracking.init_store()
    tracker = tracking.start_run("f", system_metrics=False)
    real, fails = client.log_batch, [1]

    def blip(*a, **kw):
        if fails and kw.get("metrics"):
            fails.pop()
            raise ConnectionError("server away")
        return real(*a, **kw)

    monkeypatch.setattr(tracker.client, "log_batch", blip)
    for step in range(5):
        tracker.log_metrics({"x": step}, step=step)
    with pytest.raises(tracking.StoreError, match="server away"):
        tracker.flush()
    tracker.flush()         # the store is back: the buffered points go now
    assert [m.step for m in client.get_metric_history(tracker.run_id, "x")] == [0, 1, 2, 3, 4]


# --- 9. smaller ---------------------------------------------------------------------------------------

def test_worker_processes_get_the_storage_url_outside_their_command_line(monkeypatch):
    """a7e3e38 passed --storage URL (with its password) on the workers' command lines, visible in ps."""
    from scaling_suite import worker
    started = []

    class Popen:
        def __init__(self, cmd, env=None):
            started.append((cmd, env))

    monkeypatch.setattr(subprocess, "Popen", Popen)
    url = "postgresql://user:s3cret@db.example:5432/optuna"
    worker.spawn_workers(url, "study", 2)
    assert len(started) == 2
    for cmd, env in started:
        assert not any("s3cret" in part for part in cmd)
        assert env[worker.STORAGE_ENV] == url
    monkeypatch.setenv(worker.STORAGE_ENV, url)
    assert worker.storage_url(None) == url and worker.storage_url("sqlite:///x.db") == "sqlite:///x.db"


def test_a_budget_below_the_overhead_is_refused_before_the_speed_probe(mlflow_store, capsys, monkeypatch):
    """a7e3e38 ran a 71 s speed probe before refusing --budget 1s."""
    from scaling_suite import sweep

    def probe(*a, **kw):
        raise AssertionError("the speed probe ran")

    monkeypatch.setattr(sweep, "probe_rates", probe)
    code, _, err = run_cli(["sweep", "--mode", "quick", "--budget", "1s", "--quiet"], capsys)
    assert code == 2 and "too small" in one_line(err)


def test_csv_text_in_a_numeric_column_is_named(tmp_path):
    """a7e3e38 reported it as 'NaN/inf value(s)'."""
    from analysis.inputs import read_csv_runs
    path = tmp_path / "runs.csv"
    path.write_text("N,D,loss\n1e6,2e7,3.1\nabc,4e7,2.9\n")
    with pytest.raises(SuiteError, match=r"column 'N' of runs.csv holds text .* line 3: 'abc'"):
        read_csv_runs(path)
