"""The CLI end to end against a real SQLite MLflow store, and its one-line errors."""

import subprocess
from pathlib import Path
import sys

import mlflow
import pytest
import torch

from scaling_suite import cli

FAST = ["--preset", "tiny", "--D", "40960", "--eval_every", "2", "--quiet"]


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_logs_everything(mlflow_store, token_cache, capsys):
    code, out, err = run_cli(["train", *FAST, "--experiment", "t"], capsys)
    assert code == 0, err
    client = mlflow.MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("N=")
    m = run.data.metrics
    for key in ("N", "N_nonembed", "N_total", "D", "C", "final_val_loss", "flops_per_token", "val_bpb"):
        assert key in m
    assert m["D"] == 40960 and m["N_total"] > m["N"] > m["N_nonembed"]
    assert run.data.params["depth"] == "2" and run.data.params["preset"] == "tiny"
    assert run.data.tags["role"] == "train" and run.data.tags["device"] == "cpu"
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert len(val) >= 5 and val[-1].value < val[0].value
    # The MLflow step of every metric is the number of tokens seen.
    assert [p.step for p in client.get_metric_history(run.info.run_id, "tokens")][-1] == 40960
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "stdlib/byte" and len(ds.dataset.digest) >= 16
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.pt"]
    # Logging overhead is measured on every run: seconds inside MLflow calls and their share of the wall.
    assert 0 < m["logging_seconds"] < m["wall_seconds"] and m["logging_fraction"] == pytest.approx(
        m["logging_seconds"] / m["wall_seconds"], rel=1e-6)
    assert run.data.tags["compile"] == "false" and "warm-up" in run.data.tags["compile_reason"]  # too short to pay


def test_attaches_to_mlflow_run_id(mlflow_store, token_cache, capsys, monkeypatch):
    """Under `mlflow run` the run exists (with its params logged): attach, never create."""
    client = mlflow.MlflowClient(mlflow_store)
    exp = client.create_experiment("attach")
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "lr", "3e-3")        # as `mlflow run` logs a user's -P lr=3e-3
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    code, _, err = run_cli(["train", *FAST, "--lr", "3e-3"], capsys)
    assert code == 0, err
    runs = client.search_runs([exp])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "final_val_loss" in runs[0].data.metrics and runs[0].data.params["depth"] == "2"


def test_conflicting_logged_param_is_one_line(mlflow_store, token_cache, capsys, monkeypatch):
    client = mlflow.MlflowClient(mlflow_store)
    run = client.create_run(client.create_experiment("clash"))
    client.log_param(run.info.run_id, "lr", "0.1")
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    code, _, err = run_cli(["train", *FAST, "--lr", "0.003"], capsys)
    assert code == 2 and err.count("\n") == 1 and "already has lr=0.1" in err
    assert client.get_run(run.info.run_id).info.status == "FAILED"


@pytest.mark.parametrize("argv,match", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--preset", "tiny", "--dataset", "ftp://x"], "dataset"),
    (["--preset", "tiny", "--dataset", "/no/such/dir"], "/no/such/dir"),
    (["--preset", "tiny", "--device", "cuda"], "CUDA is not available"),
    (["--preset", "tiny", "--device", "tpu"], "unknown device"),
    (["--preset", "tiny", "--D", "-5"], "D must be a positive number"),
    (["--preset", "tiny", "--C", "0", "--tokens_per_param", "-1"], "must be a positive number"),
    (["--preset", "tiny", "--tokenizer", "bpe", "--vocab_size", "70000"], "over 65535"),
    (["--preset", "tiny", "--dataset", "hf:no-such-user/no-such-dataset"], "hf:no-such-user/no-such-dataset"),
    (["--preset", "tiny", "--depth", "0"], "depth must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, match, mlflow_store, token_cache, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(["train", *argv, "--quiet"], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err


def test_unwritable_store_is_one_line(tmp_path, token_cache, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    code, _, err = run_cli(["train", *FAST], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot write the MLflow store" in err


def test_corrupt_token_cache_is_one_line(tmp_path, mlflow_store, capsys, monkeypatch):
    monkeypatch.setenv("SCALING_SUITE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"doc{i}.txt").write_text(f"document {i} " * 200)
    from scaling_suite.data import load_data
    digest = load_data(str(corpus)).digest
    (tmp_path / "cache" / digest / "meta.json").write_text("{broken")
    code, _, err = run_cli(["train", *FAST, "--dataset", str(corpus), "--eval_tokens", "1024"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is corrupt" in err


def test_console_script_exit_code(tmp_path):
    """The installed entry point, as a user runs it: a bad flag value exits non-zero in one line."""
    script = Path(sys.executable).with_name("scaling-suite")   # the venv's console script (pyproject.toml)
    assert script.exists(), f"console script not installed beside {sys.executable}"
    p = subprocess.run([str(script), "train", "--preset", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == "error: unknown preset 'nope'; choose one of: tiny, small, base"


@pytest.mark.parametrize("argv,match", [
    (["--branching", "true"], "error: branching needs schedule=wsd"),                      # cosine by default
    (["--schedule", "wsd", "--branching", "yes"], "error: branching must be one of auto, true, false"),
    (["--schedule", "wsd", "--early_stop", "true", "--branching", "true"], "error: branching and early_stop"),
])
def test_sweep_branching_errors_are_one_line(argv, match, mlflow_store, capsys):
    code, out, err = run_cli(["sweep", "--mode", "quick", "--design", "isoflop", "--quiet", *argv], capsys)
    assert code == 2 and err.startswith(match) and err.count("\n") == 1


def test_sweep_attaches_to_mlflow_run_with_the_mlproject_params(mlflow_store, token_cache, capsys, monkeypatch):
    """`mlflow run . -P mode=...` logs every MLproject parameter of `main` as typed; the study logs
    the same values (branching and lr as asked, not as resolved), so attaching never clashes."""
    client = mlflow.MlflowClient(mlflow_store)
    run = client.create_run(client.create_experiment("main-entry"))
    for k, v in {"mode": "smoke", "design": "auto", "budget": "0", "dataset": "stdlib", "schedule": "cosine",
                 "early_stop": "false", "branching": "auto", "lr": "auto"}.items():
        client.log_param(run.info.run_id, k, v)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    code, _, err = run_cli(["sweep", "--mode", "smoke", "--design", "auto", "--budget", "0", "--dataset", "stdlib",
                            "--schedule", "cosine", "--early_stop", "false", "--branching", "auto", "--lr", "auto",
                            "--no_analysis", "--quiet"], capsys)
    assert code == 0, err
    parent = client.get_run(run.info.run_id)
    assert parent.data.params["branching"] == "auto" and parent.data.tags["branching"] == "false"
    assert parent.data.params["lr_source"] in ("rule", "law")


# `doctor` (issue 17): one line per check, the devices as torch sees them, the precision a run would
# really use, three compiled steps where compiling is supported, and one `error:` line where a later
# run would fail.

def test_doctor_passes_and_reports_what_a_run_would_use(mlflow_store, token_cache, capsys):
    from scaling_suite.device import compile_support
    code, out, err = run_cli(["doctor"], capsys)
    assert code == 0 and err == "", err
    for line in ("supports torch>=2.7 on CPU, CUDA and Apple MPS", "torch.cuda.is_available() = False",
                 "torch.backends.mps.is_built() = False", "precision in force, eager: fp32",
                 "eager step", "all checks passed"):
        assert line in out
    if compile_support(torch.device("cpu")) is None:
        assert "ok    3 compiled steps" in out and "compiled step" in out and "precision in force, compiled" in out
    assert "FAIL" not in out


def test_doctor_fails_in_one_line_where_a_run_would(mlflow_store, token_cache, capsys, monkeypatch):
    """Without dynamo's recompile_limit (torch 2.4-2.6) every compiling run fails: so does doctor,
    in one line, instead of passing."""
    monkeypatch.delattr(torch._dynamo.config, "recompile_limit")
    code, out, err = run_cli(["doctor"], capsys)
    assert code == 1 and err.startswith("error: doctor found 1 problem(s): compile support:") and err.count("\n") == 1
    assert "recompile_limit" in err and "FAIL  compile support" in out


@pytest.mark.parametrize("built,match", [(False, "not built"), (True, "built but unavailable")])
def test_doctor_says_whether_mps_is_unbuilt_or_unavailable(built, match, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: built)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, out, err = run_cli(["doctor", "--device", "mps"], capsys)
    assert code == 1 and err.count("\n") == 1 and match in err
    assert f"is_built() = {built}, is_available() = False" in out
