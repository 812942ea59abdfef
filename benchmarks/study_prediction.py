"""Final-loss prediction: the study predictor leave-one-run-out vs the own-curve predictor.

    MLFLOW_TRACKING_URI=sqlite:////tmp/store/mlflow.db python benchmarks/study_prediction.py --design isoflop

Each finished run (not itself early-stopped) is predicted from its validation evaluations up to 25%
(and 50%) of its schedule with every OTHER finished run of the selection as reference
(scaling_suite.replay.leave_one_out, the lr schedules from the logged `lr` histories), against its
real final loss: the study predictor (ratio and same-model law combined), its ratio estimate alone
(no schedules given, so no same-model law; its bandwidth and level cross-validated per prediction),
the ratio at the fixed bandwidth ratio_estimate.BANDWIDTH without the level (the eleventh session's
predictor) and with equal weights (bandwidth inf: one ridge line through every run); with the share
of runs whose 95% interval holds the final loss (an interval without an upper end counts as holding
it, as the logged predict_covered does). Live:
the study predictor with, as references, only the runs that had finished (MLflow end time) when the
run reached 25% of its wall time. Early stop replayed: the stability rule (earlystop.is_stable) on the
ratio estimate's predictions at every evaluation from 25%, every other run as reference.

The own-curve predictor (earlystop.predict_final, what a run uses before MIN_REFERENCE runs of its
schedule have finished) is recomputed as train.py makes its first prediction, at predict_from of the
run: from the logged training losses (each logged mean stands for the log_every steps it averages;
runs of <= 500 steps log every step) and the validation-minus-training gap there. The logged
`predict_error` is printed beside it: it is the own-curve predictor's error only in studies run
before the study predictor existed (in later ones, runs after the first MIN_REFERENCE of a schedule
logged the study predictor's error from the runs finished before them). Aim (issue 14): median <= 2%,
max <= 5% from 25%.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from analysis import load
from scaling_suite import earlystop, ratio_estimate, replay
from scaling_suite.config import log_every
from scaling_suite.schedule import lr_from_history
from scaling_suite.study_report import reference_curve


def own_curve_error(r, curves) -> float:
    """The relative error of predict_final's first prediction, made as train.py makes it."""
    c = curves[curves["run_id"] == r["run_id"]].sort_values("tokens")
    bt, D = float(r["batch_tokens"]), float(r["D"])
    lrs = lr_from_history(c["tokens"].to_numpy(float), c["lr"].to_numpy(float), D, bt)
    if lrs is None:
        return math.nan
    train = c[c["train_loss"].notna()][["tokens", "train_loss"]].to_numpy(float)
    val = c[c["val_loss"].notna()][["tokens", "val_loss"]].to_numpy(float)
    p = replay.first_own_curve(train, [tuple(x) for x in val], lrs / float(r["lr"]), bt, log_every(len(lrs)),
                               float(r.get("predict_from", 0.25)))
    return math.nan if p is None else (p.final_loss - float(r["final_val_loss"])) / float(r["final_val_loss"])


def early_stop_replay(data: dict, bandwidth) -> str:
    """Early stop replayed with every other run as reference: the study predictor's ratio estimate at
    each evaluation from 25% of the run (as train.py predicts), earlystop.prediction_errors' rule
    (is_stable) on them: the runs it would have stopped, the compute saved, the error at the stop."""
    saved, errors = [], []
    for rid, (p, y, final, N, D, *rest) in data.items():
        ref = replay.others(data, rid)
        p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
        ne = rest[2] if len(rest) > 2 else math.nan
        preds = [earlystop.ratio_prediction(ref, p[:i + 1], y[:i + 1], int(p[i] * D), N, D, bandwidth, ne)
                 for i in range(len(p)) if 0.25 - 1e-9 <= p[i] < 1]
        out = earlystop.prediction_errors([q for q in preds if q is not None], final, D)
        saved.append(out.get("early_stop_saving", 0.0))
        if "predict_error_stable" in out:
            errors.append(abs(out["predict_error_stable"]))
    e = np.asarray(errors)
    at_stop = f", |error| at the stop median {np.median(e):.2%} max {e.max():.2%}" if e.size else ""
    return f"would stop {e.size} of {len(data)} runs, saving {np.mean(saved):.1%} of their compute{at_stop}"


def summary(errors, covered=None) -> str:
    e = np.abs(np.asarray([x for x in errors if np.isfinite(x)], dtype=float))
    cov = f", interval coverage {np.mean(list(covered)):.1%}" if covered is not None else ""
    return f"n={e.size} median {np.median(e):.2%} max {np.max(e):.2%}{cov}" if e.size else "n=0"


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
    data = {r["run_id"]: reference_curve(r, curves) for _, r in runs.iterrows()}
    print(f"{len(data)} finished runs; schedules: {sorted(set(runs['schedule']))}")
    ratio_only = {k: (*v[:5], None, math.nan, v[7]) for k, v in data.items()}    # no schedule: no same-model law
    variants = (("study predictor (ratio + same-model law)", data, None),
                ("ratio estimate alone", ratio_only, None),
                (f"ratio, fixed bandwidth {ratio_estimate.BANDWIDTH}", ratio_only, ratio_estimate.BANDWIDTH),
                ("ratio, equal weights", ratio_only, np.inf))
    new = {}
    for label, d, bw in variants:
        for at in (0.25, 0.5):
            res = replay.leave_one_out(d, at=at, bandwidth=bw)
            new.setdefault(label, {})[at] = res
            print(f"  {label} from {at:.0%}: {summary([v[1] for v in res.values()], [v[2] for v in res.values()])}")
    # Live: each run with the references a study had given it, the runs finished when it reached 25%.
    times = {r["run_id"]: (r["start_time"], r["end_time"]) for _, r in runs.iterrows()}
    live = replay.leave_one_out(data, at=0.25, references=replay.live_references(times, 0.25))
    signed = np.mean([v[1] for v in live.values()]) if live else math.nan
    print(f"  study predictor live (references finished at 25%) from 25%: "
          f"{summary([v[1] for v in live.values()], [v[2] for v in live.values()])}, mean signed {signed:+.2%}")
    for label, bw in (("chosen", None), (f"fixed bandwidth {ratio_estimate.BANDWIDTH}", ratio_estimate.BANDWIDTH)):
        print(f"  early stop replayed (ratio estimate, {label}): {early_stop_replay(ratio_only, bw)}")
    own = {r["run_id"]: own_curve_error(r, curves) for _, r in runs.iterrows()}
    print(f"  own-curve predictor (recomputed, from 25%): {summary(own.values())}")
    print(f"  logged predict_error: {summary(runs['predict_error'].astype(float))}")
    study, ratio = new[variants[0][0]][0.25], new[variants[1][0]][0.25]
    for _, r in runs.sort_values(["N", "D"]).iterrows():
        rid = r["run_id"]
        if rid in study:
            print(f"    {r['run_name']:18s} final {r['final_val_loss']:.4f}  study {study[rid][1]:+.2%}  "
                  f"ratio {ratio[rid][1]:+.2%}  own {own[rid]:+.2%}  logged {r['predict_error']:+.2%}")


if __name__ == "__main__":
    main()
