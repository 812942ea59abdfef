"""The final-loss predictors re-run on finished runs, from what the runs logged: how good early stop
would have been, and is. `leave_one_out` measures the study predictor (each run against every other
finished run); `first_own_curve` re-makes the own-curve predictor's first prediction as train.py
made it. The study summary (leave_one_out), benchmarks/study_prediction.py and the tests use them,
so what they measure is what a run does."""

from __future__ import annotations

import numpy as np

from .earlystop import Prediction, Reference, predict_final, predict_from_study, val_gap


def leave_one_out(runs: dict, at: float = 0.25, bandwidth: float | None = None, references: dict | None = None) -> dict:
    """run id -> (prediction from the run's evaluations up to progress `at` with every OTHER run as
    reference, its relative error against the run's final loss, whether its interval holds the final
    loss). runs: run id -> (progress, loss, final, N, D) or (progress, loss, final, N, D, lrs, peak_lr[,
    N_nonembed]) with lrs the run's lr at every step. references: run id -> the run ids it may use
    (`live_references`: those finished when it reached `at`); None: every other run."""
    out = {}
    for rid, (p, y, final, N, D, *rest) in runs.items():
        ref = others(runs, rid, None if references is None else references.get(rid, ()))
        p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
        seen = p <= at + 1e-9
        pred = predict_from_study(ref, p[seen], y[seen], 0, N, D, bandwidth, *rest)
        if pred is not None:
            out[rid] = (pred.final_loss, (pred.final_loss - final) / final, bool(pred.lo <= final <= pred.hi))
    return out


def others(runs: dict, rid, allowed=None) -> Reference:
    """The Reference of every run of RUNS (leave_one_out's form) but RID, or of those in ALLOWED."""
    ref = Reference()
    for other, c in runs.items():
        if other != rid and (allowed is None or other in allowed):
            ref = ref.add(*c)
    return ref


def live_references(times: dict, at: float = 0.25) -> dict:
    """run id -> the runs that had finished when it reached `at` of its wall time, from
    times: run id -> (start, end), MLflow's milliseconds: what a live study gave it."""
    return {rid: {o for o, (_, e2) in times.items() if o != rid and e2 < s + at * (e - s)}
            for rid, (s, e) in times.items()}


def first_own_curve(train_loss, val_loss, lrs, batch_tokens: int, log_every: int,
                    predict_from: float) -> Prediction | None:
    """predict_final's first prediction of a finished run, as train.py made it: at the first
    evaluation at or after PREDICT_FROM of the run that gives one, from the training losses before it
    and the validation-minus-training gap there (earlystop.val_gap).

    TRAIN_LOSS: the logged [(tokens, loss)], each the mean of the LOG_EVERY steps up to it (train.py
    keeps every step's loss, MLflow their means: each mean stands for its steps). VAL_LOSS: the logged
    [(tokens, loss)]. LRS: the lr multipliers (of the peak) at every step; their number is the run's
    step count. None when no evaluation gives a prediction."""
    steps = len(lrs)
    per_step = np.full(steps, np.nan)
    for t, v in train_loss:
        s = int(round(t / batch_tokens))
        per_step[max(0, s - log_every):s] = v
    for t, v in sorted(val_loss):
        s = int(round(t / batch_tokens))
        if not predict_from * steps <= s < steps:
            continue
        seen = [x for x in per_step[:s] if np.isfinite(x)]
        p = predict_final(seen, lrs, val_gap(seen, v, steps), int(t)) if seen else None
        if p is not None:
            return p
    return None
