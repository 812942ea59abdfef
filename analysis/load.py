"""Runs and learning curves out of MLflow into typed DataFrames (the only MLflow use in analysis/,
and read-only). The tracking URI is whatever `mlflow.get_tracking_uri()` gives: the caller sets it.

Run format written by the training code (scaling_suite.tracking): params = every RunConfig field by
its own name (params["C"] is the requested FLOP budget, params["D"] the requested tokens);
metrics N, N_nonembed, N_total, D, C, flops_per_token, final_val_loss, final_train_loss, val_bpb
(latest values) plus per-step histories whose MLflow step is the number of tokens seen; tags role,
mode, design, predicted and mlflow.parentRunId.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from scaling_suite.errors import SuiteError

# mlflow is imported inside the functions that read the store (a deliberately lazy heavy library:
# ~3.5 s to import), so analysis from a CSV never pays it.

RUN_METRICS = ("N", "N_nonembed", "N_total", "D", "C", "flops_per_token", "final_val_loss",
               "final_train_loss", "val_bpb")
# What the study report reads of each run (compute spent, early-stop error), NaN where not logged.
STUDY_METRICS = ("C_spent", "predict_error", "predict_error_stable", "early_stop_saving")
RUN_TAGS = ("mode", "design", "role", "branch_of")
BASE_COLUMNS = ("run_id", "run_name", "status", "experiment_id", "parent_run_id", "start_time", "end_time", "N",
                "N_nonembed", "N_total", "D", "C", "C_budget", "flops_per_token", "final_val_loss",
                "final_train_loss", "val_bpb", "mode", "design", "role", "branch_of", "predicted",
                *STUDY_METRICS)
CURVE_METRICS = ("tokens", "flops", "train_loss", "val_loss", "lr")
CURVE_COLUMNS = ("run_id", "step", "tokens", "flops", "train_loss", "val_loss", "lr")
FITTING_ROLES = ("train", "trial")


def _client(client):
    if client is not None:
        return client
    import mlflow
    return mlflow.MlflowClient()


def _store_error(client, exc) -> SuiteError:
    return SuiteError(f"MLflow store {store_uri(client)} could not be read: {exc}")


def _experiment_ids(client, names) -> list[str]:
    if isinstance(names, str):
        names = [names]
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise SuiteError(f"unknown MLflow experiment {name!r} at {store_uri(client)} "
                             f"(known: {', '.join(known) or 'none'})")
        ids.append(exp.experiment_id)
    return ids


def store_uri(client=None) -> str:
    """The URI of the store `client` (or a default client) reads."""
    import mlflow
    return getattr(client, "tracking_uri", None) or mlflow.get_tracking_uri()   # MlflowClient.tracking_uri


def _search(client, experiment_ids, filter_string="") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _float(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _row(run) -> dict:
    info, data = run.info, run.data
    tags, params, metrics = data.tags, data.params, data.metrics
    row = {"run_id": info.run_id, "run_name": info.run_name, "status": info.status,
           "experiment_id": info.experiment_id, "parent_run_id": tags.get("mlflow.parentRunId"),
           "start_time": info.start_time, "end_time": info.end_time}
    row.update({k: _float(metrics.get(k)) for k in RUN_METRICS + STUDY_METRICS})
    budget = _float(params.get("C"))
    row["C_budget"] = budget if budget > 0 else math.nan   # "None"/"0" mean "no budget given"
    row.update({k: tags.get(k) for k in RUN_TAGS})
    row["predicted"] = str(tags.get("predicted", "")).lower() == "true"
    for k, v in params.items():
        row[f"param_{k}" if k in BASE_COLUMNS else k] = v
    return row


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Params arrive as strings: make a column numeric when every non-empty value parses."""
    for col in df.columns:
        if col in BASE_COLUMNS or pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            continue
        vals = df[col].where(~df[col].isin(["None", "", "nan"]), None)
        num = pd.to_numeric(vals, errors="coerce")
        if num.notna().sum() == vals.notna().sum():     # all "None" -> all NaN too
            df[col] = num.astype(float)
    return df


def load_runs(experiment_names=None, parent_run_id: str | None = None, client=None) -> pd.DataFrame:
    """One row per run: BASE_COLUMNS, then every param under its own name (``param_<name>`` where
    the name is already a column, e.g. param_C, param_D). Filters: experiments by name (str or
    list; all experiments when None) and/or a parent run (its descendants, any depth). Keeps every
    role and status; `fitting_runs` selects the finished training runs."""
    from mlflow.exceptions import MlflowException
    client = _client(client)
    try:
        parent = _get_run(client, parent_run_id) if parent_run_id is not None else None
        if experiment_names is not None:
            ids = _experiment_ids(client, experiment_names)
        elif parent is not None:
            ids = [parent.info.experiment_id]
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        if parent is not None:
            runs, frontier = [], [parent_run_id]
            for _ in range(8):                    # study -> optimize -> trial is three levels
                if not frontier:
                    break
                level = []
                for pid in frontier:
                    level.extend(_search(client, ids, f"tags.mlflow.parentRunId = '{pid}'"))
                runs.extend(level)
                frontier = [r.info.run_id for r in level]
        else:
            runs = _search(client, ids) if ids else []
    except MlflowException as exc:
        raise _store_error(client, exc) from None
    df = pd.DataFrame([_row(r) for r in runs])
    if df.empty:
        return pd.DataFrame(columns=list(BASE_COLUMNS))
    for col in BASE_COLUMNS:
        if col not in df:
            df[col] = math.nan
    rest = [c for c in df.columns if c not in BASE_COLUMNS]
    return _typed(df[list(BASE_COLUMNS) + rest].reset_index(drop=True))


def _get_run(client, run_id):
    from mlflow.exceptions import MlflowException
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise SuiteError(f"unknown MLflow run {run_id!r} at {store_uri(client)}") from None


def fitting_runs(runs_df: pd.DataFrame, loss_col: str = "final_val_loss") -> pd.DataFrame:
    """The rows that are scaling-law data: role train/trial, status FINISHED, a finite loss."""
    if runs_df.empty:
        return runs_df
    keep = (runs_df["role"].isin(FITTING_ROLES) & (runs_df["status"] == "FINISHED")
            & np.isfinite(runs_df[loss_col].astype(float)))
    return runs_df[keep].reset_index(drop=True)


def load_curves(run_ids, client=None) -> pd.DataFrame:
    """Long format, one row per (run, step): CURVE_COLUMNS. Histories of tokens, flops, train_loss,
    val_loss, lr are joined on the MLflow step (= tokens seen); a missing tokens history falls back
    to the step, a missing flops history to tokens x the run's flops_per_token."""
    from mlflow.exceptions import MlflowException
    client = _client(client)
    frames = []
    for run_id in ([run_ids] if isinstance(run_ids, str) else list(run_ids)):
        run = _get_run(client, run_id)
        cols = {}
        try:
            for key in CURVE_METRICS:
                hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
                if hist:   # the later of two values logged at one step wins (a resumed run re-logs)
                    cols[key] = pd.Series({m.step: m.value for m in hist}, dtype=float)
        except MlflowException as exc:
            raise _store_error(client, exc) from None
        if not cols:
            continue
        df = pd.DataFrame(cols).sort_index()
        df.index.name = "step"
        df = df.reset_index()
        for key in CURVE_METRICS:
            if key not in df:
                df[key] = math.nan
        df["tokens"] = df["tokens"].fillna(df["step"].astype(float))
        fpt = _float(run.data.metrics.get("flops_per_token"))
        if np.isfinite(fpt):
            df["flops"] = df["flops"].fillna(df["tokens"] * fpt)
        df.insert(0, "run_id", run_id)
        frames.append(df[list(CURVE_COLUMNS)])
    if not frames:
        return pd.DataFrame(columns=list(CURVE_COLUMNS))
    out = pd.concat(frames, ignore_index=True)
    out["step"] = out["step"].astype(np.int64)
    return out
