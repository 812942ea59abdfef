"""Final-loss prediction: the study predictor leave-one-run-out vs the old own-curve predictor.

    MLFLOW_TRACKING_URI=sqlite:////tmp/store/mlflow.db python benchmarks/study_prediction.py --design isoflop

Each finished run (not itself early-stopped) is predicted from its validation evaluations up to 25%
(and 50%) of its schedule with every OTHER finished run of the selection as reference
(scaling_suite.earlystop.leave_one_out), against its real final loss; once with the default
bandwidth, once with equal weights. The old predictor's error is the `predict_error` metric each run
logged (its first prediction, at predict_from = 25%, from its own curve). Aim (issue 14): median
<= 2%, max <= 5% from 25%.
"""

from __future__ import annotations

import argparse

import numpy as np

from analysis import load
from scaling_suite import earlystop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--design", default=None, help="only runs of this design (isoflop, n_sweep, ...)")
    p.add_argument("--parent_run", default=None, help="only the children of this study run")
    a = p.parse_args()
    runs = load.fitting_runs(load.load_runs(parent_run_id=a.parent_run))
    if a.design:
        runs = runs[runs["design"] == a.design]
    runs = runs[~runs["predicted"].astype(bool)]
    curves = load.load_curves(runs["run_id"])
    data = {}
    for _, r in runs.iterrows():
        g = curves[(curves["run_id"] == r["run_id"]) & curves["val_loss"].notna()].sort_values("tokens")
        data[r["run_id"]] = (g["tokens"].to_numpy() / r["D"], g["val_loss"].to_numpy(), r["final_val_loss"], r["N"], r["D"])
    print(f"{len(data)} finished runs")
    for label, bw in ((f"study predictor (bandwidth {earlystop.BANDWIDTH})", earlystop.BANDWIDTH),
                      ("study predictor, equal weights", np.inf)):
        for at in (0.25, 0.5):
            e = np.abs([v[1] for v in earlystop.leave_one_out(data, at=at, bandwidth=bw).values()])
            print(f"  {label} from {at:.0%}: n={len(e)} median {np.median(e):.2%} max {np.max(e):.2%}")
    old = np.abs(runs["predict_error"].astype(float).dropna().to_numpy())
    if old.size:
        print(f"  old predictor (logged predict_error, 25%): n={old.size} median {np.median(old):.2%} max {np.max(old):.2%}")
    new = earlystop.leave_one_out(data, at=0.25)
    for _, r in runs.sort_values(["C", "N"]).iterrows():
        if r["run_id"] in new:
            print(f"    {r['run_name']:18s} final {r['final_val_loss']:.4f}  new {new[r['run_id']][1]:+.2%}  "
                  f"old {r['predict_error']:+.2%}")


if __name__ == "__main__":
    main()
