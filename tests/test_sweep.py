"""The study runner: a parent with nested children, idempotent re-runs, resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from scaling_suite import plan as plan_lib
from scaling_suite import tracking
from scaling_suite.errors import SuiteError
from scaling_suite.schedule import lr_per_step
from scaling_suite.sweep import run_study
from scaling_suite.checkpoint import config_from_params


def children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_smoke_plan_is_small_and_log_spaced():
    p = plan_lib.make_plan("smoke")
    assert 2 <= len(p.points) <= 4 and p.design == "n_sweep"
    Ns = [pt.config.derived().N for pt in p.points]
    assert Ns == sorted(Ns) and Ns[-1] / Ns[0] > 10


def test_quick_plan_meets_its_spec():
    p = plan_lib.make_plan("quick")
    Ns = [pt.config.derived().N for pt in p.points]
    assert len(p.points) >= 8 and len({pt.tags["C_budget"] for pt in p.points}) >= 3
    assert max(Ns) / min(Ns) >= 10 ** 1.5


@pytest.mark.parametrize("mode,design,match", [("huge", None, "unknown mode"), ("quick", "grid", "unknown design")])
def test_bad_mode_or_design(mode, design, match):
    with pytest.raises(SuiteError, match=match):
        plan_lib.make_plan(mode, design)


def test_durations():
    assert plan_lib.parse_duration("10m") == 600 and plan_lib.parse_duration("1h30m") == 5400
    assert plan_lib.parse_duration("90") == 90
    with pytest.raises(SuiteError, match="cannot read the duration"):
        plan_lib.parse_duration("ten minutes")


def test_time_budget_scales_the_plan():
    rate = {k: 5e10 for k in range(1, 10)}
    small = plan_lib.fit_to_time("quick", None, 300, rate)
    big = plan_lib.fit_to_time("quick", None, 1200, rate)
    assert len(small.points) == len(big.points) == len(plan_lib.make_plan("quick").points)
    assert plan_lib.estimate_seconds(small, rate) <= 300 - 40 < plan_lib.estimate_seconds(big, rate)
    with pytest.raises(SuiteError, match="too small"):
        plan_lib.fit_to_time("quick", None, 30, rate)


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory, token_cache):
    """The smoke study, trained once for the tests of this file (experiment "s", no analysis yet):
    (tracking URI, outcome). Tests that use it attach to its store with `smoke_store`."""
    root = tmp_path_factory.mktemp("smoke-study")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mp.chdir(root)
        outcome = run_study(plan_lib.make_plan("smoke"), "s", progress=False, analyze=False)
    return uri, outcome


@pytest.fixture
def smoke_store(smoke_study, monkeypatch, tmp_path):
    uri, outcome = smoke_study
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return uri, outcome


def test_study_is_idempotent(smoke_store):
    uri, first = smoke_store
    plan = plan_lib.make_plan("smoke")
    assert [c.status for c in first.children] == ["FINISHED"] * len(plan.points)
    again = run_study(plan, "s", progress=False, analyze=True)
    assert [c.status for c in again.children] == ["SKIPPED"] * len(plan.points)
    assert again.parent_run_id == first.parent_run_id
    client = mlflow.MlflowClient(uri)
    kids = [k for k in children(client, first.parent_run_id) if k.data.tags.get("role") != "analysis"]
    assert len(kids) == len(plan.points) and all(k.info.status == "FINISHED" for k in kids)
    assert sorted(k.info.run_name for k in kids)[0].startswith("N=")
    # The end of the study: report, plots and the study's own facts on the parent.
    logged = {a.path for a in client.list_artifacts(first.parent_run_id, "analysis")}
    assert {"analysis/report.md", "analysis/report.json", "analysis/study.json", "analysis/loss_vs_N.png"} <= logged
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and "predict_error_median" in parent.data.metrics
    # Three sizes at one D: the loss falls with N, and the study says so for its one group.
    checks = again.report["study"]["monotone_in_N"]
    assert len(checks) == 1 and all(v is True for v in checks.values()), checks
    # Two runs had finished when the third started: its final-loss predictions came from them.
    assert again.report["study"]["study_prediction"]["n_runs"] == 3
    assert "study_predict_error_median" in parent.data.metrics
    _third_run_predicted_from_the_first_two(client, first.children)


def _third_run_predicted_from_the_first_two(client, outcomes):
    from scaling_suite import earlystop

    def curve(run_id):
        h = sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)
        return [m.step for m in h], [m.value for m in h]

    def schedule(run_id):
        cfg = config_from_params(client.get_run(run_id).data.params)
        return lr_per_step(cfg, cfg.derived()), cfg.lr

    ref = earlystop.Reference()
    for o in outcomes[:2]:
        m = client.get_run(o.run_id).data.metrics
        t, v = curve(o.run_id)
        ref = ref.add([x / m["D"] for x in t], v, m["final_val_loss"], m["N"], m["D"], *schedule(o.run_id),
                      m["N_nonembed"])
    third = outcomes[2].run_id
    m = client.get_run(third).data.metrics
    logged = sorted(client.get_metric_history(third, "predicted_final_loss"), key=lambda x: x.step)
    t, v = curve(third)
    seen = [i for i, x in enumerate(t) if x <= logged[0].step]
    lrs, peak = schedule(third)
    want = earlystop.predict_from_study(ref, [t[i] / m["D"] for i in seen], [v[i] for i in seen], logged[0].step,
                                        m["N"], m["D"], lrs=lrs, peak_lr=peak, N_nonembed=m["N_nonembed"])
    assert logged[0].value == pytest.approx(want.final_loss, rel=1e-9)


def test_analyze_cli_nests_under_the_study(smoke_store, capsys):
    from scaling_suite import cli
    uri, study = smoke_store
    assert cli.main(["analyze", "--experiment", "s", "--bootstrap", "20", "--no_plots"]) == 0
    client = mlflow.MlflowClient(uri)
    (analysis,) = [k for k in children(client, study.parent_run_id) if k.data.tags.get("role") == "analysis"]
    assert analysis.info.status == "FINISHED"
    assert any(a.path == "analysis/report.md" for a in client.list_artifacts(analysis.info.run_id, "analysis"))
    assert cli.main(["analyze", "--experiment", "missing"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown MLflow experiment 'missing' in " + uri


def test_sigkill_mid_study_then_rerun_resumes(mlflow_store, token_cache, tmp_path):
    """Kill the study process mid-child; the re-run finishes it with no duplicate FINISHED child."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    # checkpoint often so the kill lands after a checkpoint of the running child
    cmd = [sys.executable, "-m", "scaling_suite.cli", "sweep", "--mode", "smoke", "--experiment", "k",
           "--quiet", "--no_analysis"]
    client = tracking.init_store(mlflow_store)   # created before the child, which this process polls (test_faults)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    killed_run = None
    while time.time() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("k")
        if exp:
            for r in client.search_runs([exp.experiment_id], "tags.role = 'train' and attributes.status = 'RUNNING'"):
                if any(a.path == "checkpoints/last.pt" for a in client.list_artifacts(r.info.run_id, "checkpoints")):
                    killed_run = r.info.run_id
            if killed_run:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.2)
    proc.wait()
    assert killed_run, "the study finished before a checkpoint could be interrupted"
    assert client.get_run(killed_run).info.status == "RUNNING"     # left behind by the kill
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    exp = client.get_experiment_by_name("k").experiment_id
    train_runs = client.search_runs([exp], "tags.role = 'train'")
    finished = [r for r in train_runs if r.info.status == "FINISHED"]
    assert len(finished) == len(plan_lib.make_plan("smoke").points) == len(train_runs)
    assert client.get_run(killed_run).info.status == "FINISHED"     # the same run, resumed
    hist = client.get_metric_history(killed_run, "tokens")
    assert hist[-1].step == client.get_run(killed_run).data.metrics["D"]


# --- WSD cooldown branching (Hägele et al. 2024 §3.2) ---------------------------------------------

def test_quick_wsd_plan_branches_at_under_0_6_of_the_independent_cost():
    wsd = plan_lib.make_plan("quick", None, {"schedule": "wsd"})
    assert wsd.branching and len(wsd.points) == 25 and len({p.tags["C_budget"] for p in wsd.points}) == 5
    br = wsd.branches()
    assert len(br) == 20                                    # one trunk per depth: the largest budget
    for i, (t, s) in br.items():
        a, b = wsd.points[i].config, wsd.points[t].config
        assert a.depth == b.depth and a.derived().D < b.derived().D and a.warmup_tokens == b.warmup_tokens
    assert wsd.spent_flops() <= 0.6 * wsd.total_flops()
    assert wsd.spent_flops() < plan_lib.make_plan("quick").total_flops()      # cheaper than cosine quick
    off = plan_lib.make_plan("quick", None, {"schedule": "wsd"}, "false")
    assert not off.branching and off.branches() == {} and off.spent_flops() == off.total_flops()
    assert [p.config for p in off.points] == [p.config for p in wsd.points] and off.key != wsd.key
    assert not plan_lib.make_plan("quick").branching and len(plan_lib.make_plan("quick").points) == 13
    with pytest.raises(SuiteError, match="branching needs schedule=wsd"):
        plan_lib.make_plan("quick", None, None, "true")
    with pytest.raises(SuiteError, match="branching must be one of"):
        plan_lib.make_plan("quick", None, {"schedule": "wsd"}, "maybe")


def wsd_smoke_plan(branching="auto"):
    # smoke's d_sweep: one size, 5 token budgets 2x apart (8..128 steps): one trunk, 4 branches.
    return plan_lib.make_plan("smoke", "d_sweep", {"schedule": "wsd", "device": "cpu", "precision": "fp32"},
                              branching)


def final_losses_alone(plan, data):
    """Each branch's config trained from scratch, independently (no MLflow)."""
    from scaling_suite.train import train
    return {p.config.D: train(p.config, data=data, progress=False).final_val_loss
            for i, p in enumerate(plan.points) if i in plan.branches()}


def test_branching_study_matches_independent_runs(mlflow_store, token_cache):
    from scaling_suite import data as data_lib
    plan = wsd_smoke_plan()
    assert len(plan.branches()) == 4
    study = run_study(plan, "b", progress=False, analyze=True, n_bootstrap=20)
    assert [c.status for c in study.children] == ["FINISHED"] * 5
    client = mlflow.MlflowClient(mlflow_store)
    kids = children(client, study.parent_run_id)
    (trunk,) = [k for k in kids if "branch_of" not in k.data.tags]
    branches = [k for k in kids if "branch_of" in k.data.tags]
    assert len(branches) == 4 and {b.data.tags["branch_of"] for b in branches} == {trunk.info.run_id}
    assert trunk.data.metrics["C_spent"] == trunk.data.metrics["C"]
    alone = final_losses_alone(plan, data_lib.load_data("stdlib"))
    for b in branches:
        m, step = b.data.metrics, int(b.data.tags["branch_step"])
        assert m["C_spent"] == pytest.approx(m["C"] * (1 - step / m["steps"]))
        assert m["final_val_loss"] == pytest.approx(alone[m["D"]], abs=1e-5)
        tokens = [p.step for p in client.get_metric_history(b.info.run_id, "tokens")]
        assert tokens[:2] == [0, 2048] and tokens[-1] == m["D"]   # the trunk's steps, then its own
        assert b.data.tags["history_from_trunk"] == str(step * 2048)
    ratio = client.get_run(study.parent_run_id).data.metrics["C_spent_ratio"]
    assert ratio == pytest.approx(plan.spent_flops() / plan.total_flops()) and ratio < 0.7
    from pathlib import Path
    summary = Path(client.download_artifacts(study.parent_run_id, "analysis/summary.txt")).read_text()
    assert f"ratio {ratio:.2f} (4 runs were WSD cooldown branches" in summary
    again = run_study(plan, "b", progress=False, analyze=False)
    assert [c.status for c in again.children] == ["SKIPPED"] * 5


@pytest.mark.slow   # about 45 s on one core: three studies of 5 runs and 4 independent runs
def test_kill_mid_trunk_and_mid_branch_then_rerun_resumes(mlflow_store, token_cache, monkeypatch):
    """A kill mid-trunk resumes the trunk; a kill mid-branch resumes the branch from its own
    checkpoint; nothing finished is retrained, and the branches still equal independent runs."""
    from scaling_suite import data as data_lib
    from scaling_suite import sweep
    plan = wsd_smoke_plan()
    real_train, kills, calls = sweep.train, {131072: 62, 262144: 60}, []

    def killed_train(cfg, tracker, **kw):
        calls.append((cfg.D, kw.get("resume_from") is not None, kw.get("branch_from") is not None))
        if cfg.D in kills:   # Ctrl-C as the run draws the batch of that step
            kill, real_batch = kills.pop(cfg.D), data_lib.train_batch

            def batch(data, seed, step, *rest):
                if step == kill:
                    raise KeyboardInterrupt
                return real_batch(data, seed, step, *rest)

            with monkeypatch.context() as m:
                m.setattr(data_lib, "train_batch", batch)
                return real_train(cfg, tracker, **kw)
        return real_train(cfg, tracker, **kw)

    monkeypatch.setattr(sweep, "train", killed_train)
    with pytest.raises(KeyboardInterrupt):          # the trunk (D=262144, 128 steps) at step 60
        run_study(plan, "k", progress=False, analyze=False)
    with pytest.raises(KeyboardInterrupt):          # the first branch (64 steps, from step 51) at step 62
        run_study(plan, "k", progress=False, analyze=False)
    study = run_study(plan, "k", progress=False, analyze=False)
    assert calls == [(262144, False, False), (262144, True, False), (131072, False, True),
                     (131072, True, False), (65536, False, True), (32768, False, True), (16384, False, True)]
    assert [c.status for c in study.children] == ["SKIPPED", "FINISHED", "FINISHED", "FINISHED", "FINISHED"]
    assert study.children[1].resumed
    client = mlflow.MlflowClient(mlflow_store)
    kids = children(client, study.parent_run_id)
    assert len(kids) == 5 and all(k.info.status == "FINISHED" for k in kids)
    alone = final_losses_alone(plan, data_lib.load_data("stdlib"))
    for k in kids:
        if "branch_of" in k.data.tags:
            assert k.data.metrics["final_val_loss"] == pytest.approx(alone[k.data.metrics["D"]], abs=1e-5)
            assert k.data.metrics["C_spent"] < k.data.metrics["C"]


def test_a_rerun_config_is_fitted_once_from_its_newest_run():
    """After a code change a study retrains its configurations beside the old runs: fit each once."""
    import pandas as pd

    from scaling_suite.study_report import newest_per_config

    runs = pd.DataFrame({"run_id": ["old", "other", "new"], "start_time": [1, 3, 2], "depth": ["1", "2", "1"],
                         "param_C": ["6e11"] * 3, "final_val_loss": [2.0, 1.9, 2.1]})
    kept = newest_per_config(runs)
    assert sorted(kept["run_id"]) == ["new", "other"]
    assert newest_per_config(kept).equals(kept)
