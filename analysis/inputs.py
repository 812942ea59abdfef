"""Command-line flags of `analyze` and the two ways in: a CSV file or runs in MLflow.

Either way the result is a runs DataFrame with columns N, D, C and a loss column (plus design /
C_budget / run_id where known), and every problem with the input is a one-line SuiteError.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from scaling_suite.errors import SuiteError

from . import extrapolate, load
from .common import check_positive

PASSTHROUGH = ("design", "C_budget", "run_id", "run_name", "predicted")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = parser.add_argument_group("data (a CSV file, or MLflow runs; default: every experiment in MLflow)")
    src.add_argument("--csv", metavar="FILE", help="one row per run")
    src.add_argument("--experiment", action="append", metavar="NAME", help="MLflow experiment (repeatable)")
    src.add_argument("--parent_run", metavar="ID", help="MLflow parent run: analyze its (nested) children")
    col = parser.add_argument_group("columns")
    col.add_argument("--N_col", default="N", help="parameters column (MLflow: N, N_nonembed or N_total)")
    col.add_argument("--D_col", default="D", help="tokens column; if absent D = C / (6 N)")
    col.add_argument("--C_col", default="C", help="FLOPs column; if absent C = 6 N D")
    col.add_argument("--loss_col", default=None, help="loss column (default: loss for CSV, final_val_loss for MLflow)")
    fit = parser.add_argument_group("fitting")
    fit.add_argument("--drop_highest", type=int, default=0, metavar="K",
                     help="drop the K highest-loss runs first (Besiroglu et al. 2024 drop 5)")
    fit.add_argument("--grid", default="published", choices=["published", "coarse"],
                     help="Chinchilla start grid: the published 4,500 starts or a 243-start one")
    fit.add_argument("--bootstrap", type=int, default=1000, metavar="B", help="bootstrap resamples (0: none)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--target_N", type=float, default=extrapolate.DEFAULT_TARGET_N, help="extrapolate loss to this N")
    fit.add_argument("--target_C", type=float, default=extrapolate.DEFAULT_TARGET_C, help="extrapolate loss to this C")
    parser.add_argument("--out", default="out/analysis", metavar="DIR", help="report.md, report.json, PNGs")
    parser.add_argument("--no_plots", action="store_true", help="skip the figures")
    return parser


def _check_args(args):
    if args.csv and (args.experiment or args.parent_run):
        raise SuiteError("use either --csv or --experiment/--parent_run, not both")
    if args.bootstrap < 0:
        raise SuiteError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.drop_highest < 0:
        raise SuiteError(f"--drop_highest must be >= 0, got {args.drop_highest}")
    for flag, v in (("--target_N", args.target_N), ("--target_C", args.target_C)):
        if not (np.isfinite(v) and v > 0):
            raise SuiteError(f"{flag} must be a positive number, got {v}")


def load_inputs(args):
    """(runs_df, curves_df or None, loss_col, notes, source) for the parsed flags."""
    _check_args(args)
    if args.csv:
        runs, notes = read_csv_runs(args.csv, args.N_col, args.D_col, args.C_col, args.loss_col or "loss",
                                    args.drop_highest)
        return runs, None, "loss", notes, str(args.csv)
    return _from_mlflow(args)


def read_csv_runs(path, N_col="N", D_col="D", C_col="C", loss_col="loss", drop_highest=0):
    """Runs from a CSV: columns renamed to N, D, C, loss. D = C/(6N) or C = 6ND when one is absent
    (Kaplan et al. 2020 §2.1's C ≈ 6ND, as the published Chinchilla data need: they have no D)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"CSV file not found: {path}")
    try:
        raw = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SuiteError(f"could not read {path} as CSV: {exc}") from None
    cols = ", ".join(map(str, raw.columns))
    for col, flag in ((N_col, "--N_col"), (loss_col, "--loss_col")):
        if col not in raw.columns:
            raise SuiteError(f"column {col!r} not in {path.name} (columns: {cols}); choose it with {flag}")
    if D_col not in raw.columns and C_col not in raw.columns:
        raise SuiteError(f"{path.name} needs a tokens column ({D_col!r}, --D_col) or a FLOPs column "
                         f"({C_col!r}, --C_col); columns: {cols}")
    if raw.empty:
        raise SuiteError(f"{path.name} has no rows")

    def column(name):
        values = pd.to_numeric(raw[name], errors="coerce")
        text = (values.isna() & raw[name].notna()).to_numpy()   # coerced to NaN, but was not empty
        if text.any():
            i = int(text.argmax())
            raise SuiteError(f"column {name!r} of {path.name} holds text where numbers belong: {int(text.sum())} "
                             f"value(s), the first on line {i + 2}: {raw[name].iloc[i]!r}")
        return check_positive(f"column {name!r}", values)
    df = pd.DataFrame({"N": column(N_col), "loss": column(loss_col)})
    notes = []
    if D_col in raw.columns:
        df["D"] = column(D_col)
    else:
        df["D"] = column(C_col) / (6.0 * df["N"])
        notes.append(f"D derived as C / (6 N) from {C_col!r} (no {D_col!r} column)")
    if C_col in raw.columns:
        df["C"] = column(C_col)
    else:
        df["C"] = 6.0 * df["N"] * df["D"]
        notes.append(f"C derived as 6 N D (no {C_col!r} column)")
    for extra in PASSTHROUGH:
        if extra in raw.columns and extra not in df:
            df[extra] = raw[extra].to_numpy()
    if drop_highest:
        if drop_highest >= len(df):
            raise SuiteError(f"--drop_highest {drop_highest} would drop all {len(df)} runs")
        threshold = sorted(df["loss"])[-drop_highest]
        n0 = len(df)
        df = df[df["loss"] < threshold].reset_index(drop=True)
        notes.append(f"dropped the {n0 - len(df)} highest-loss runs (kept loss < {threshold:.6g}), "
                     f"leaving {len(df)}")
    return df, notes


def _from_mlflow(args):
    loss_col = args.loss_col or "final_val_loss"
    where = (f"experiment(s) {', '.join(args.experiment)}" if args.experiment else "all experiments")
    if args.parent_run:
        where += f", children of run {args.parent_run}"
    runs = load.load_runs(args.experiment, args.parent_run)
    if loss_col not in runs:
        raise SuiteError(f"no column {loss_col!r} in the MLflow runs of {where}")
    runs = load.fitting_runs(runs, loss_col)
    if runs.empty:
        raise SuiteError(f"no FINISHED train/trial runs with a finite {loss_col} in {where}")
    notes = []
    for name, flag in ((args.N_col, "N"), (args.D_col, "D"), (args.C_col, "C")):
        if name not in runs:
            raise SuiteError(f"no column {name!r} in the MLflow runs (choose with --{flag}-col)")
        if name != flag:
            runs[flag] = runs[name]
            notes.append(f"{flag} taken from {name!r}")
    ok = runs[["N", "D", "C"]].gt(0).all(axis=1)
    if not ok.all():
        notes.append(f"{int((~ok).sum())} run(s) without N/D/C metrics left out")
        runs = runs[ok].reset_index(drop=True)
    if runs["predicted"].any():
        notes.append(f"{int(runs['predicted'].sum())} final loss(es) are early-stop predictions")
    curves = load.load_curves(runs["run_id"])
    return runs, curves, loss_col, notes, f"MLflow {load.store_uri()}: {where}"
