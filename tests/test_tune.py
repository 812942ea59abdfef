"""Learning-rate tuning per size, the lr law, lr=auto for studies, and the pruning hook."""

import json
import math

import mlflow
import numpy as np
import pytest

from scaling_suite import plan as plan_lib
from scaling_suite import lr_auto, tracking, tune, tune_report
from scaling_suite.cli import main
from scaling_suite.config import make_config
from scaling_suite.errors import SuiteError

SMOKE_TUNE = ["tune", "--mode", "smoke", "--depths", "1", "2", "--trials", "3", "--tokens_per_param", "5",
              "--quiet", "--device", "cpu", "--precision", "fp32"]


@pytest.mark.parametrize("extra, message", [
    (["--depths", "2"], "needs at least 2 sizes"),
    (["--depths", "2", "2"], "needs at least 2 sizes"),
    (["--lr_min", "0"], "--lr_min must be a positive number"),
    (["--lr_max=-1e-3"], "--lr_max must be a positive number"),
    (["--lr_min", "1e-2", "--lr_max", "1e-3"], "the learning-rate range is empty"),
    (["--lr_min", "1e-2", "--lr_max", "1e-2"], "the learning-rate range is empty"),
    (["--mode", "huge"], "unknown mode"),
    (["--lr_min", "tiny"], "--lr_min takes numbers"),
    (["--trials", "1"], "--trials must be at least 2"),
])
def test_bad_input_is_one_line_before_training(extra, message, mlflow_store, capsys, tmp_path):
    argv = ["tune", "--mode", "smoke", "--storage", f"sqlite:///{tmp_path}/optuna.db", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "optuna.db").exists()        # rejected before any storage, run or training


def test_fit_lr_law_recovers_a_planted_law():
    from analysis.fit import fit_lr_law, lr_law_band

    N = np.logspace(4, 6, 5)
    lr = 0.5 * N ** -0.3 * np.exp(np.random.default_rng(0).normal(0, 0.05, N.size))
    fit = fit_lr_law(N, lr)
    assert fit.params["k"] == pytest.approx(0.3, abs=0.05)
    lo, hi = fit.intervals["k"]
    assert lo < 0.3 < hi and lo < fit.params["k"] < hi
    assert fit.predict(1e5) == pytest.approx(0.5 * 1e5 ** -0.3, rel=0.1)
    band = lr_law_band(fit, np.array([1e4, 1e5, 1e6]))
    assert np.all(band[0] < fit.predict(np.array([1e4, 1e5, 1e6]))) and np.all(band[1] > band[0])
    assert "lr_law" in fit.report() and "k" in fit.intervals


def test_lr_grid_and_optimum():
    g = tune.lr_grid(1e-3, 1e-1, 3)
    assert g[0] == pytest.approx(1e-2) and sorted(g) == pytest.approx([1e-3, 1e-2, 1e-1])
    # a parabola in log10 lr with its vertex at 10^-2.2; one trial pruned, one at another beta2.
    # 12 trials: the bootstrap over trials bounds the optimum only where few resamples lose every
    # trial on one side of the best (with 6 it is unbounded, NaN, which the last lines check).
    rows = [{"state": "COMPLETE", "lr": lr, "beta2": 0.95, "final_val_loss": 2 + 0.4 * (math.log10(lr) + 2.2) ** 2}
            for lr in np.logspace(-3, -1.4, 12)]
    rows += [{"state": "PRUNED", "lr": 0.1, "beta2": 0.95, "final_val_loss": math.nan},
             {"state": "COMPLETE", "lr": 0.003, "beta2": 0.999, "final_val_loss": 2.5}]
    opt = tune_report.fit_optimum(rows, window=1.0)
    assert opt["status"] == "ok" and opt["beta2_subset"] is True
    assert opt["lr_opt"] == pytest.approx(10 ** -2.2, rel=0.01) and opt["lr_lo"] < opt["lr_opt"] < opt["lr_hi"]
    assert tune_report.fit_optimum([], 0.5)["status"] == "no_trials"
    few = tune_report.fit_optimum(rows[:12:2], window=1.0)
    assert few["status"] == "ok" and (math.isnan(few["lr_lo"]) or math.isnan(few["lr_hi"]))


def test_pruned_child_is_visible_and_not_retrained(mlflow_store, token_cache):
    from scaling_suite.sweep import run_child
    from scaling_suite.train import Pruned

    cfg = make_config(depth=1, aspect=16, head_dim=8, context=32, batch_tokens=512, eval_tokens=1024, D=40 * 512,
                      eval_every=5, device="cpu", precision="fp32")
    parent = tracking.start_run(run_name="t", system_metrics=False)
    seen = []

    def hook(step, loss):
        seen.append(step)
        if step >= 10:
            raise Pruned(step, "pruned for the test")

    out = run_child(cfg, parent.run_id, tags={"role": tune.TRIAL_ROLE}, progress=False, on_eval=hook)
    assert out.status == "PRUNED" and out.tokens_trained == 10 * 512 and seen == [0, 5, 10]
    run = mlflow.MlflowClient(mlflow_store).get_run(out.run_id)
    assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true"
    assert run.data.tags["role"] == tune.TRIAL_ROLE                    # not overwritten with "train"
    assert run.data.metrics["tokens_trained"] == 10 * 512 and "final_val_loss" not in run.data.metrics
    again = run_child(cfg, parent.run_id, tags={"role": tune.TRIAL_ROLE}, progress=False, on_eval=hook)
    assert again.status == "PRUNED" and again.run_id == out.run_id and seen == [0, 5, 10]   # no retraining


def _fake_law(parts_cfg, digest, c, k, lr_base=None, k_interval=None):
    key, _ = lr_auto.law_key(parts_cfg, digest)
    run = tracking.start_run(run_name="lr tuning", tags={"role": tune.ROLE, "lr_law_key": key}, system_metrics=False)
    extra = {"lr_law_k_lo": k_interval[0], "lr_law_k_hi": k_interval[1]} if k_interval else {}
    run.log_metrics({"lr_law_c": c, "lr_law_k": k, **({"lr_base": lr_base} if lr_base else {}), **extra}, step=0)
    run.finish("FINISHED")
    return run.run_id


def test_lr_auto_uses_the_matching_law_else_the_rule(mlflow_store, token_cache):
    from scaling_suite import data as data_lib

    plan = plan_lib.make_plan("smoke")
    first = plan.points[0].config
    data = data_lib.load_data(first.dataset, first.tokenizer, first.vocab_size)
    # No law: the documented rule, per run.
    ruled, info = lr_auto.resolve_lr(plan, data)
    assert info["lr_source"] == "rule" and info["lr_law_run_id"] == "-"
    assert [p.config.lr for p in ruled.points] == pytest.approx([lr_auto.rule_lr(p.config) for p in plan.points])
    # A law for another schedule does not match; one for this design does.
    _fake_law(first.replace(schedule="wsd"), data.digest, 1.0, 0.5)
    assert lr_auto.resolve_lr(plan, data)[1]["lr_source"] == "rule"
    law_id = _fake_law(first, data.digest, 0.2, 0.25)
    lawed, info = lr_auto.resolve_lr(plan, data)
    assert info["lr_source"] == "law" and info["lr_law_run_id"] == law_id
    assert [p.config.lr for p in lawed.points] == pytest.approx([0.2 * p.config.derived().N ** -0.25 for p in plan.points])
    # A law from a few sizes can be poorly determined: its interval on k is said where the lrs are.
    _fake_law(first, data.digest, 0.2, 0.25, k_interval=(-0.41, 1.71))
    assert "lr = 0.2 N^-0.2500 (k: 95% interval [-0.41, 1.71])" in lr_auto.resolve_lr(plan, data)[1]["lr_rule"]
    assert "(k: 95% interval [-0.41, 1.71])" in lr_auto.rule_for(first, data, None)[1]["lr_rule"]
    # A number is a fixed value everywhere.
    fixed, info = lr_auto.resolve_lr(plan, data, 1e-3)
    assert info["lr_source"] == "fixed" and {p.config.lr for p in fixed.points} == {1e-3}
    # mup: the tuned base lr of a mup law, for every width.
    mplan = plan_lib.make_plan("smoke", overrides={"parametrization": "mup", "mup_base_width": 16})
    assert lr_auto.resolve_lr(mplan, data)[1]["lr_source"] == "rule"
    mup_id = _fake_law(mplan.points[0].config, data.digest, 0.01, 0.01, lr_base=0.02)
    mupped, info = lr_auto.resolve_lr(mplan, data)
    assert info["lr_source"] == "mup" and info["lr_law_run_id"] == mup_id
    assert {p.config.lr for p in mupped.points} == {0.02}


def test_lr_auto_on_a_fresh_machine_uses_the_preset_law_for_quick(mlflow_store, token_cache):
    from scaling_suite import data as data_lib

    plan = plan_lib.make_plan("quick")
    first = plan.points[0].config
    data = data_lib.load_data(first.dataset, first.tokenizer, first.vocab_size)
    preset = lr_auto.preset_law(first)
    assert preset is not None
    lrs, info = lr_auto.resolve_lr(plan, data)
    assert info["lr_source"] == "preset" and "lr_auto.PRESET_LAWS" in info["lr_rule"]
    assert [p.config.lr for p in lrs.points] == pytest.approx(
        [preset["c"] * p.config.derived().N ** -preset["k"] for p in plan.points])
    assert max(p.config.lr for p in lrs.points) / min(p.config.lr for p in lrs.points) > 10   # falls with N
    # Other shapes or another schedule: not the preset's (the rule); a law tuned here wins over it.
    assert lr_auto.resolve_lr(plan_lib.make_plan("quick", overrides={"schedule": "wsd"}), data)[1]["lr_source"] == "rule"
    law_id = _fake_law(first, data.digest, 0.2, 0.25)
    assert lr_auto.resolve_lr(plan, data)[1]["lr_law_run_id"] == law_id


def test_fixed_lr_over_a_decade_warns():
    import pandas as pd

    from scaling_suite.study_report import lr_facts

    runs = pd.DataFrame({"N": [7e3, 3e4, 1e5], "lr": [3e-3] * 3})
    assert "warning" in lr_facts({"lr_source": "fixed", "lr": "0.003"}, runs)
    assert "warning" not in lr_facts({"lr_source": "law"}, runs.assign(lr=[1e-2, 6e-3, 4e-3]))
    assert "warning" not in lr_facts({"lr_source": "fixed"}, runs.iloc[:2])      # under a decade


def test_tune_then_sweep_with_lr_auto(mlflow_store, token_cache, tmp_path, capsys):
    """Smoke-scale tuning end to end: nested trials, per-size optima, the law and its artifacts on
    the tuning run, compute accounting; then `sweep` finds the law and its children use it."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    code = main([*SMOKE_TUNE, "--storage", storage, "--lr_min", "1e-3", "--lr_max", "5e-2"])
    out = capsys.readouterr().out
    assert code == 0, out
    client = mlflow.MlflowClient(mlflow_store)
    (tuning,) = tracking.find_runs_in(client, tracking.DEFAULT_EXPERIMENT, {"role": tune.ROLE})
    m = tuning.data.metrics
    assert tuning.info.status == "FINISHED" and {"lr_law_c", "lr_law_k", "compute_saved"} <= set(m)
    assert f"k = {m['lr_law_k']:.4f}" in out and "compute saved" in out
    trials = client.search_runs([tuning.info.experiment_id], f"tags.mlflow.parentRunId = '{tuning.info.run_id}'")
    assert len(trials) == 6 and {t.data.tags["role"] for t in trials} == {tune.TRIAL_ROLE}
    law = json.loads(open(client.download_artifacts(tuning.info.run_id, "lr_law.json", str(tmp_path))).read())
    trained = sum(r["flops_trained"] for s in law["sizes"] for r in s["trials"])
    full = sum(r["C"] for s in law["sizes"] for r in s["trials"])
    assert law["compute_saved"] == pytest.approx(1 - trained / full) and 0 < law["compute_saved"] < 1
    # Seeded: at least one trial of this smoke tuning is pruned; its FLOPs are its tokens actually trained.
    pruned = [t for t in trials if t.data.tags.get("pruned") == "true"]
    assert pruned, "no trial was pruned, so the compute accounting was not exercised"
    for t in pruned:
        assert t.info.status == "KILLED" and t.data.metrics["tokens_trained"] < t.data.metrics["D"]
    assert "plots/lr_law.png" in [a.path for a in client.list_artifacts(tuning.info.run_id, "plots")]
    hist = client.get_metric_history(tuning.info.run_id, "lr_opt")
    assert sorted(h.step for h in hist) == sorted(s["N"] for s in law["sizes"])

    assert main(["sweep", "--mode", "smoke", "--quiet", "--no_analysis", "--device", "cpu"]) == 0
    (study,) = tracking.find_runs_in(client, tracking.DEFAULT_EXPERIMENT, {"role": "study"})
    p = study.data.params
    assert p["lr"] == "auto" and p["lr_source"] == "law" and p["lr_law_run_id"] == tuning.info.run_id
    kids = client.search_runs([study.info.experiment_id], f"tags.mlflow.parentRunId = '{study.info.run_id}'")
    for k in kids:
        assert float(k.data.params["lr"]) == pytest.approx(m["lr_law_c"] * k.data.metrics["N"] ** -m["lr_law_k"])


def test_check_settings_rejects_a_search_without_lr():
    with pytest.raises(SuiteError, match="--search takes lr"):
        tune.check_settings([1, 2], 1e-3, 1e-2, 4, 20, 0.3, ("beta2",), tune.BETA2)
