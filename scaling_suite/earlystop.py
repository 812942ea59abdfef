"""Predict a run's final loss from the first part of its learning curve.

Two predictors: `predict_from_study` (below), once a study has MIN_REFERENCE finished runs of the
run's schedule, from what they share; before that, `predict_final` from the run's own curve.
`predict` chooses; train.py calls it at every evaluation after predict_from.

A plain power law in tokens, L(t) = E + A·t^-alpha, cannot see the drop a decaying learning rate
brings at the end of a cosine or WSD run, so it overshoots the final loss. We use the
schedule-aware form of Tissue et al. 2024 ("Scaling Law with Learning Rate Annealing", eq. 1):

    L(s) = L0 + A · S1(s)^(-alpha) - C · S2(s)

where S1 is the "forward area" (the sum of learning rates so far, in units of the peak) and S2
the "annealing area" (the accumulated learning-rate decrease, with momentum lambda = 0.999,
their §3). Both are known for every future step because the schedule is fixed in advance, so a
fit on the observed part (the per-step training losses averaged in bins, plus the current
validation-minus-training gap) predicts the final loss.

"Stable": the last `STABLE_COUNT` predictions agree within `STABLE_TOL` (relative spread) and
the 95% interval's half-width is under `STABLE_TOL` of the prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .ratio_estimate import Reference, log_ratio, normalized

LAMBDA = 0.999        # Tissue et al. 2024 §3: decay of the annealing momentum
STABLE_COUNT = 3
STABLE_TOL = 0.01
ANNEAL_SEEN = 0.5     # predict_final fits the annealing term once this share of the lr decay is seen


def schedule_areas(lrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S1 (forward area) and S2 (annealing area) after each step, for lrs normalized to peak 1."""
    s1 = np.cumsum(lrs)
    m = np.zeros_like(lrs)
    for i in range(1, len(lrs)):
        m[i] = LAMBDA * m[i - 1] + (lrs[i - 1] - lrs[i])
    return s1, np.cumsum(m)


def law(s1, s2, L0, A, alpha, C):
    return L0 + A * np.power(s1, -alpha) - C * s2


def _multistart(resid, starts, bounds):
    """The least-squares fit of RESID with the lowest cost over STARTS (None if none converged)."""
    from scipy.optimize import least_squares     # lazy: scipy is heavy and only fits need it

    best = None
    for p0 in starts:
        try:
            r = least_squares(resid, p0, bounds=bounds)
        except ValueError:
            continue
        if best is None or r.cost < best.cost:
            best = r
    return best


@dataclass(frozen=True)
class Prediction:
    tokens_seen: int
    final_loss: float
    lo: float                # the 95% interval; lo = 0, hi = inf: nothing to bound it by
    hi: float


def predict_final(train_losses: list[float], lrs: np.ndarray, val_gap: float, tokens_seen: int,
                  bins: int = 60) -> Prediction | None:
    """Fit the observed steps' training losses; predict the last step's validation loss.

    LRS covers the whole run (normalized to the peak), TRAIN_LOSSES the steps seen so far.
    Returns None when there are too few points to fit.
    """
    n = len(train_losses)
    if n < 20:
        return None
    lr = np.asarray(lrs, dtype=np.float64)
    s1, s2 = schedule_areas(lr)
    # Skip the first 10% of observed steps (warmup transients), then average into bins: the
    # per-step loss is noisy and nearly independent step to step, so bin means have honest errors.
    start = max(1, n // 10)
    idx = np.array_split(np.arange(start, n), min(bins, n - start))
    x1 = np.array([s1[i].mean() for i in idx])
    x2 = np.array([s2[i].mean() for i in idx])
    y = np.array([np.mean([train_losses[j] for j in i]) for i in idx])

    # The annealing term C·S2 is fitted only once the steps seen hold at least half of the lr decay
    # (or no decay is ahead). Earlier (25% of a cosine run; WSD before its cooldown) the curve does not
    # identify C, and S2's growth to the end multiplies its error: a quick n_sweep's 7.47k run was
    # predicted at -1.64 (it ended at 1.889). There C = 0, which errs high but boundedly (docs: max
    # error from 25% on 134 stored runs 2895% -> 27.6%), and with no lower end: early stop waits.
    total, seen = lr.max() - lr[-1], lr[:n].max() - lr[n - 1]     # the decay in all, and seen so far
    anneal = int(bool(total <= 1e-12 * lr.max() or seen >= ANNEAL_SEEN * total))

    def resid(p):
        return law(x1, x2, *_unpack(p)) - y

    start0 = [max(0.0, y.min() - 0.5), math.log(max(1e-3, y[0] - y.min() + 0.5))]
    bounds = ([0, -10, 0.01] + [0] * anneal, [y.min(), 10, 3] + [100] * anneal)
    best = _multistart(resid, [start0 + [a0] + [0.1] * anneal for a0 in (0.3, 0.6, 1.0)], bounds)
    if best is None:
        return None
    p = best.x
    final = float(law(s1[-1], s2[-1], *_unpack(p))) + val_gap
    # Delta-method interval from the fit's covariance (residual variance × (JᵀJ)⁻¹).
    J = best.jac
    dof = max(1, len(y) - len(p))
    sigma2 = 2 * best.cost / dof
    try:
        cov = np.linalg.pinv(J.T @ J) * sigma2
    except np.linalg.LinAlgError:
        return None
    eps = 1e-6
    grad = np.array([(law(s1[-1], s2[-1], *_unpack(p + eps * e)) - law(s1[-1], s2[-1], *_unpack(p - eps * e)))
                     / (2 * eps) for e in np.eye(len(p))])
    se = float(math.sqrt(max(0.0, grad @ cov @ grad)))
    return Prediction(tokens_seen, final, final - 1.96 * se if anneal else 0.0, final + 1.96 * se)


def _unpack(p):
    """(L0, A, alpha, C) of the fitted vector (log A; C = 0 when it is not fitted)."""
    return p[0], math.exp(p[1]), p[2], (p[3] if len(p) > 3 else 0.0)


def is_stable(history: list[Prediction]) -> bool:
    if len(history) < STABLE_COUNT:
        return False
    last = [h.final_loss for h in history[-STABLE_COUNT:]]
    spread = (max(last) - min(last)) / abs(last[-1])
    return spread < STABLE_TOL and (history[-1].hi - history[-1].lo) / 2 / abs(history[-1].final_loss) < STABLE_TOL


def val_gap(train_losses, val_loss: float, steps: int) -> float:
    """The validation-minus-training gap at an evaluation: VAL_LOSS minus the mean training loss of
    the last max(5, steps/50) steps seen (TRAIN_LOSSES) of a run of STEPS steps. predict_final fits
    the training loss; the gap carries its prediction to the validation loss."""
    recent = list(train_losses)[-max(5, steps // 50):]
    return val_loss - float(np.mean(recent))


# --- prediction from the study: what finished runs of the same schedule share ----------------------
#
# One run's first quarter is a short, noisy curve (predict_final above missed by a median 7.8%, max
# 24%, from 25% of a quick study's runs). Finished runs of the study share two things with a running
# one, and the study predictor combines both (docs/isoflop-and-prediction.md: measurements, choice):
#
# 1. The schedule (`ratio`): the drop still ahead of a run at schedule progress p (tokens / D) is
#    much like the drop its finished siblings took from p to their end, so one estimate is the run's
#    own validation loss at p times the finished runs' ratio final / loss(p), read in log space off a
#    line in (log N_nonembed, log D and, where it helps, the run's own log loss at p: the level)
#    through them with Gaussian weights on the distance (scaling_suite/ratio_estimate.py): how much
#    a run still gains depends on its size, its budget and how far it still stands above where its
#    siblings stood; the nearest siblings count most, how near chosen by cross-validation over them.
#    Size is measured without the embedding and the head (Kaplan et al. 2020 §3.1, Fig. 6: with
#    them, runs of other depths fall on other trends): at 3k-60k parameters the head is most of N
#    (docs/isoflop-and-prediction.md: 2.36% -> 1.92% median error).
# 2. The model (`same_model`): finished runs of the same size and peak lr are the same model under
#    other schedule lengths. Tissue et al. 2024 fit ONE parameter set (L0, A, alpha, C) of their
#    eq. 1 per model and predict its loss under other schedules from their areas S1, S2; so the
#    second estimate is that law fitted jointly to those runs' whole validation curves and the
#    running run's curve so far, evaluated at the running run's last step.
#
# The two err in different places, so the prediction is their geometric mean (an equal-weight
# forecast combination, Bates & Granger 1969) and the interval the hull of both: early stop stops
# only where they agree. Without a finished run of the same model at least as long
# (same_model_prediction says why) the ratio alone is used: in an n_sweep and in IsoFLOP studies
# trained budget by budget; the law serves WSD cooldown branches, which follow their longer trunk.

MIN_REFERENCE = 2      # finished runs needed before the study predictor is used


def _law_points(progress, loss, mult):
    """The schedule's areas at each evaluation after step 0 (progress · steps optimizer steps
    taken), those evaluations' losses, and the areas at the run's end."""
    s1, s2 = schedule_areas(mult)
    steps = np.rint(np.asarray(progress, dtype=float) * len(mult)).astype(int)
    ok = (steps >= 1) & (steps <= len(mult))
    return s1[steps[ok] - 1], s2[steps[ok] - 1], np.asarray(loss, dtype=float)[ok], s1[-1], s2[-1]


def ratio_prediction(reference: Reference, progress, loss, tokens_seen: int, N: float, D: float,
                     bandwidth: float | None = None, N_nonembed: float = math.nan) -> Prediction | None:
    """Estimate 1 (above): the latest loss times the reference runs' final/partial ratio at that
    progress, read off a weighted local line at this run's (size, D) and loss there
    (ratio_estimate.log_ratio: the line, its setting, chosen by cross-validation unless BANDWIDTH is
    given, and its interval).
    None with no reference run or no evaluation past the start; no upper end where nothing is
    measured, so early stop cannot stop on it."""
    if len(reference) == 0:
        return None
    p, y = np.asarray(progress, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(p) & np.isfinite(y) & (p > 0) & (y > 0)
    if not keep.any():
        return None
    i = int(np.argmax(np.where(keep, p, -np.inf)))
    losses = reference.log_losses(float(p[i]))       # each reference's log loss at this run's progress
    m, half = log_ratio(reference.log_finals() - losses, reference.offsets(N, D, N_nonembed),
                        losses - math.log(y[i]), bandwidth)
    final = float(y[i] * math.exp(m))
    if not half < 20:       # a factor e^20: nothing measured
        return Prediction(int(tokens_seen), final, 0.0, math.inf)
    return Prediction(int(tokens_seen), final, final * math.exp(-half), final * math.exp(half))


def same_model_prediction(same: list, progress, loss, lrs, peak_lr: float, tokens_seen: int) -> Prediction | None:
    """Estimate 2 (above): the Tissue et al. 2024 law L0 + A·S1^-alpha - C·S2 with one parameter set
    fitted to the reference runs of the same model (SAME, from Reference.same_model: their whole
    validation curves) and this run's evaluations so far (PROGRESS, LOSS; LRS its learning rate at
    every step, PEAK_LR its peak), in log loss (the error that matters is relative); the run's
    final loss is the law at its last step (areas in multipliers of the common peak). C's sign is
    free: on runs of 50-6000 steps the fitted C is near 0, at times slightly negative (docs).
    Interval: delta method on the fit (as predict_final).

    None when nothing can be fitted, and for a run longer (in steps) than every finished run of its
    model: S2 grows with the step count, so C·S2 at a longer run's end multiplies an error in C by
    the length ratio (a 0.0016 change in C moved a 4x longer run's prediction from +2.7% to -21.5%,
    docs). The law is used inside the lengths it was fitted on only."""
    mult, _ = normalized(lrs, peak_lr)
    if mult is None or not same:
        return None
    if len(mult) > max(len(c[5]) for c in same):
        return None     # longer than every finished run of the model: see the docstring
    own = _law_points(progress, loss, mult)
    pts = [_law_points(c[0], c[1], c[5]) for c in same] + [own]
    x1 = np.concatenate([q[0] for q in pts])
    x2 = np.concatenate([q[1] for q in pts])
    y = np.concatenate([q[2] for q in pts])
    if own[2].size == 0 or y.size < 5 or not np.all(y > 0):
        return None

    def f(p, s1, s2):
        return np.maximum(law(s1, s2, p[0], math.exp(p[1]), p[2], p[3]), 1e-9)

    def resid(p):
        return np.log(f(p, x1, x2)) - np.log(y)

    best = _multistart(resid, [[0.5 * y.min(), math.log(max(1e-3, y.max())), a0, 0.0] for a0 in (0.3, 0.7, 1.2)],
                       ([0, -20, 0.01, -1], [y.min(), 20, 4, 1]))
    if best is None:
        return None
    p, end1, end2 = best.x, own[3], own[4]
    final = float(f(p, end1, end2))
    dof = max(1, y.size - p.size)
    cov = np.linalg.pinv(best.jac.T @ best.jac) * (2 * best.cost / dof)
    eps = 1e-6
    grad = np.array([(math.log(f(p + eps * e, end1, end2)) - math.log(f(p - eps * e, end1, end2))) / (2 * eps)
                     for e in np.eye(p.size)])
    se = float(math.sqrt(max(0.0, grad @ cov @ grad)))
    return Prediction(int(tokens_seen), final, final * math.exp(-1.96 * se), final * math.exp(1.96 * se))


def predict_from_study(reference: Reference, progress, loss, tokens_seen: int, N: float, D: float,
                       bandwidth: float | None = None, lrs=None, peak_lr: float = math.nan,
                       N_nonembed: float = math.nan) -> Prediction | None:
    """The final loss of a run (size N, budget D) whose validation curve so far is (progress, loss):
    the geometric mean of the ratio estimate and, where the reference holds runs of the same model
    (same N and peak lr; LRS, this run's learning rate at every step, and PEAK_LR given), the
    same-model law's;
    the interval is the hull of theirs. None with fewer than MIN_REFERENCE reference runs or no
    evaluation past the start."""
    if len(reference) < MIN_REFERENCE:
        return None
    ratio = ratio_prediction(reference, progress, loss, tokens_seen, N, D, bandwidth, N_nonembed)
    if ratio is None:
        return None
    mult, peak = normalized(lrs, peak_lr)
    model = None if mult is None else same_model_prediction(reference.same_model(N, peak), progress, loss, lrs,
                                                             peak, tokens_seen)
    if model is None:
        return ratio
    final = math.sqrt(ratio.final_loss * model.final_loss)
    return Prediction(int(tokens_seen), final, min(ratio.lo, model.lo, final), max(ratio.hi, model.hi, final))


def predict(reference: Reference | None, curve, N: float, D: float, train_losses, lrs, val_gap: float,
            tokens_seen: int, peak_lr: float = 1.0, N_nonembed: float = math.nan) -> Prediction | None:
    """What train.py calls: the study predictor when `reference` holds MIN_REFERENCE finished runs
    of this run's schedule, else the run's own curve (predict_final). curve: [(tokens, val_loss)];
    lrs: the run's lr multipliers per step (of its peak, PEAK_LR)."""
    if reference is not None and len(reference) >= MIN_REFERENCE:
        return predict_from_study(reference, [t / D for t, _ in curve], [v for _, v in curve], tokens_seen, N, D,
                                  lrs=np.asarray(lrs, dtype=float) * peak_lr, peak_lr=peak_lr,
                                  N_nonembed=N_nonembed)
    return predict_final(train_losses, lrs, val_gap, tokens_seen)


def prediction_errors(predictions: list, actual: float, D: int) -> dict[str, float]:
    """How good early stop would have been on this run (measured, since it ran to the end).

    predict_error: relative error of the first prediction (made at predict_from of the run);
    predict_error_stable: that of the prediction at which early stop would have stopped;
    early_stop_saving: the fraction of the run's compute early stop would have saved.
    """
    if not predictions:
        return {}
    out = {"predict_error": (predictions[0].final_loss - actual) / actual,
           "predict_covered": float(predictions[0].lo <= actual <= predictions[0].hi)}
    for i in range(len(predictions)):
        if is_stable(predictions[:i + 1]):
            out["predict_error_stable"] = (predictions[i].final_loss - actual) / actual
            out["early_stop_saving"] = 1 - predictions[i].tokens_seen / D
            break
    else:
        out["early_stop_saving"] = 0.0
    return out
