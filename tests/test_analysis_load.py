"""analysis.load against a real temporary SQLite MLflow store, written the way the training code does."""

import argparse
import json
import math
import os

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from analysis import laws, load, synthetic  # noqa: E402
from analysis.__main__ import cli  # noqa: E402
from analysis.report import add_arguments, main  # noqa: E402
from scaling_suite.errors import SuiteError  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store per module (creating the SQLite schema takes seconds): a study parent with three
    training children (one predicted, one failed), an optimize parent with a nested trial, and an
    unrelated experiment."""
    tmp = tmp_path_factory.mktemp("mlflow")
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/m.db")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("scaling", artifact_location=str(tmp / "artifacts"))
    other = client.create_experiment("other", artifact_location=str(tmp / "artifacts2"))
    study = client.create_run(exp, run_name="study", tags={"role": "study", "mode": "quick"}).info.run_id
    ids = {}
    for name, N, budget, status, predicted in [("a", 1e5, "1e13", "FINISHED", False),
                                              ("b", 3e5, "1e13", "FINISHED", True),
                                              ("c", 1e6, "None", "FAILED", False)]:
        tags = {"role": "train", "mode": "quick", "design": "isoflop", "mlflow.parentRunId": study}
        if predicted:
            tags["predicted"] = "true"
        rid = client.create_run(exp, run_name=name, tags=tags).info.run_id
        ids[name] = rid
        fpt = 6 * N
        D = 1e13 / fpt
        params = {"N": str(N), "C": budget, "D": "None", "depth": "2", "lr": "0.003", "dataset": "stdlib"}
        client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
        steps = [0, 1000, 2000, 3000]
        hist = []
        for s in steps:
            hist += [Metric("tokens", s, 0, s), Metric("flops", s * fpt, 0, s), Metric("lr", 3e-3, 0, s)]
            if s:
                hist.append(Metric("train_loss", 5.0 - s / 1000, 0, s))
            if s in (0, 2000, 3000):
                hist.append(Metric("val_loss", 5.5 - s / 1000, 0, s))
        final = {"N": N, "N_nonembed": 0.8 * N, "N_total": 1.1 * N, "D": D, "C": fpt * D,
                 "flops_per_token": fpt, "final_val_loss": 2.5 + N ** -0.1, "final_train_loss": 2.4,
                 "val_bpb": 1.2}
        hist += [Metric(k, v, 0, 3000) for k, v in final.items()]
        client.log_batch(rid, metrics=hist)
        client.set_terminated(rid, status)
    opt = client.create_run(exp, run_name="opt", tags={"role": "optimize", "mlflow.parentRunId": study}).info.run_id
    trial = client.create_run(exp, run_name="trial0", tags={"role": "trial", "mlflow.parentRunId": opt}).info.run_id
    client.log_batch(trial, metrics=[Metric("final_val_loss", 3.0, 0, 0), Metric("N", 2e5, 0, 0)])
    client.set_terminated(trial, "FINISHED")
    client.create_run(other, run_name="x", tags={"role": "train"})
    iso_parent = _log_isoflop_study(client, tmp)
    yield {"client": client, "study": study, "ids": ids, "opt": opt, "trial": trial, "iso_parent": iso_parent,
           "uri": f"sqlite:///{tmp}/m.db"}
    mlflow.set_tracking_uri(old)


def _log_isoflop_study(client, tmp):
    """A planted-law IsoFLOP study (3 budgets x 4 sizes, with val-loss curves) in experiment "iso"."""
    exp = client.create_experiment("iso", artifact_location=str(tmp / "artifacts3"))
    parent = client.create_run(exp, run_name="iso-study", tags={"role": "study"}).info.run_id
    runs = synthetic.isoflop_runs(budgets=(1e17, 1e18, 1e19), n_per_budget=4, width=0.6, noise=0.002, seed=3)
    for _, r in runs.iterrows():
        rid = client.create_run(exp, tags={"role": "train", "design": "isoflop", "mlflow.parentRunId": parent}).info.run_id
        fpt = 6 * r["N"]
        metrics = [Metric(k, float(v), 0, 0) for k, v in (("N", r["N"]), ("D", r["D"]), ("C", r["C"]),
                                                         ("flops_per_token", fpt), ("final_val_loss", r["loss"]))]
        for t in np.linspace(r["D"] / 8, r["D"], 8).round():    # evenly spaced in steps, as train.py evaluates
            metrics.append(Metric("val_loss", float(laws.chinchilla(r["N"], t, **synthetic.PLANTED)), 0, int(t)))
        client.log_batch(rid, metrics=metrics, params=[Param("C", str(r["C_budget"]))])
        client.set_terminated(rid, "FINISHED")
    return parent


def test_load_runs_columns_types_and_collisions(store):
    df = load.load_runs("scaling")
    assert list(df.columns[:len(load.BASE_COLUMNS)]) == list(load.BASE_COLUMNS)
    assert len(df) == 6                                    # study, a, b, c, opt, trial
    a = df.set_index("run_name").loc["a"]
    assert a["N"] == 1e5 and a["N_nonembed"] == 8e4 and a["N_total"] == pytest.approx(1.1e5)
    assert a["C_budget"] == 1e13                           # params["C"] is the requested budget
    assert a["param_C"] == 1e13 and math.isnan(a["param_D"])   # colliding params keep their values
    assert a["C"] == pytest.approx(1e13) and a["flops_per_token"] == 6e5
    assert a["role"] == "train" and a["design"] == "isoflop" and a["mode"] == "quick"
    assert a["parent_run_id"] == store["study"] and a["status"] == "FINISHED"
    assert a["depth"] == 2 and a["lr"] == 0.003 and a["dataset"] == "stdlib"   # typed params
    assert df.set_index("run_name").loc["b", "predicted"] == True  # noqa: E712
    assert not a["predicted"]
    assert math.isnan(df.set_index("run_name").loc["c", "C_budget"])            # "None" = no budget


def test_fitting_runs_keeps_finished_train_and_trial(store):
    df = load.fitting_runs(load.load_runs(["scaling"]))
    assert sorted(df["run_name"]) == ["a", "b", "trial0"]


def test_parent_filter_follows_nested_children(store):
    df = load.load_runs(parent_run_id=store["study"])
    assert sorted(df["run_name"]) == ["a", "b", "c", "opt", "trial0"]
    only_opt = load.load_runs(experiment_names="scaling", parent_run_id=store["opt"])
    assert list(only_opt["run_name"]) == ["trial0"]
    assert len(load.load_runs(["scaling", "other"])) == 7


def test_load_curves_joins_histories_on_step(store):
    ids = store["ids"]
    cur = load.load_curves([ids["a"], ids["b"]])
    assert list(cur.columns) == list(load.CURVE_COLUMNS)
    a = cur[cur["run_id"] == ids["a"]].set_index("step")
    assert list(a.index) == [0, 1000, 2000, 3000]
    assert a.loc[2000, "val_loss"] == pytest.approx(3.5) and math.isnan(a.loc[1000, "val_loss"])
    assert a.loc[1000, "train_loss"] == pytest.approx(4.0) and math.isnan(a.loc[0, "train_loss"])
    np.testing.assert_allclose(a["flops"], a["tokens"] * 6e5)
    assert cur["step"].dtype == np.int64


def test_unknown_experiment_and_run_are_one_line_errors(store):
    with pytest.raises(SuiteError) as err:
        load.load_runs("no-such-experiment")
    assert "unknown MLflow experiment 'no-such-experiment'" in str(err.value)
    assert "scaling" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SuiteError, match="unknown MLflow run"):
        load.load_runs(parent_run_id="0" * 32)
    with pytest.raises(SuiteError, match="unknown MLflow run"):
        load.load_curves(["f" * 32])


def test_empty_experiment_gives_empty_frame(store):
    client = store["client"]
    client.create_experiment("empty")
    df = load.load_runs("empty")
    assert df.empty and list(df.columns) == list(load.BASE_COLUMNS)
    assert load.fitting_runs(df).empty


def test_analyze_command_reads_an_mlflow_study(store, tmp_path, capsys, monkeypatch):
    """`analyze --parent_run ID` end to end: runs and curves from MLflow into every section."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert cli(["--parent_run", store["iso_parent"], "--grid", "coarse", "--bootstrap", "0", "--no_plots",
                "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "report.json").read_text())
    assert res["data"]["n_runs"] == 12 and res["data"]["loss_col"] == "final_val_loss"
    for key in ("chinchilla", "allocation_isoflop", "allocation_envelope", "allocation_parametric"):
        assert key in res["sections"], (key, res["skipped"])
    assert len(res["sections"]["allocation_isoflop"]["table"]) == 3
    assert "Chinchilla fit" in capsys.readouterr().out


def test_analyze_command_errors_on_unknown_or_empty_experiment(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert cli(["--experiment", "no-such", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown MLflow experiment 'no-such'") and err.count("\n") == 1
    with pytest.raises(SuiteError, match="no FINISHED train/trial runs"):
        main(add_arguments(argparse.ArgumentParser()).parse_args(["--experiment", "other", "--out", str(tmp_path / "o")]))
