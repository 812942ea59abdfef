"""Predict a run's final loss from the first part of its learning curve.

A plain power law in tokens, L(t) = E + A·t^-alpha, cannot see the drop a decaying learning rate
brings at the end of a cosine or WSD run, so it overshoots the final loss. We use the
schedule-aware form of Tissue et al. 2024 ("Scaling Law with Learning Rate Annealing", eq. 1):

    L(s) = L0 + A · S1(s)^(-alpha) - C · S2(s)

where S1 is the "forward area" (the sum of learning rates so far, in units of the peak) and S2
the "annealing area" (the accumulated learning-rate decrease, with momentum lambda = 0.999,
their §3). Both are known for every future step because the schedule is fixed in advance, so a
fit on the observed part predicts the final loss.

The fit uses the per-step training losses (many points, averaged in bins), then adds the
current validation-minus-training gap, measured at the latest evaluations.

"Stable": the last `STABLE_COUNT` predictions agree within `STABLE_TOL` (relative spread) and
the 95% interval's half-width is under `STABLE_TOL` of the prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LAMBDA = 0.999        # Tissue et al. 2024 §3: decay of the annealing momentum
STABLE_COUNT = 3
STABLE_TOL = 0.01


def schedule_areas(lrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S1 (forward area) and S2 (annealing area) after each step, for lrs normalized to peak 1."""
    s1 = np.cumsum(lrs)
    m = np.zeros_like(lrs)
    for i in range(1, len(lrs)):
        m[i] = LAMBDA * m[i - 1] + (lrs[i - 1] - lrs[i])
    return s1, np.cumsum(m)


def law(s1, s2, L0, A, alpha, C):
    return L0 + A * np.power(s1, -alpha) - C * s2


@dataclass(frozen=True)
class Prediction:
    tokens_seen: int
    final_loss: float
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def predict_final(train_losses: list[float], lrs: np.ndarray, val_gap: float, tokens_seen: int,
                  bins: int = 60) -> Prediction | None:
    """Fit the observed steps' training losses; predict the last step's validation loss.

    LRS covers the whole run (normalized to the peak), TRAIN_LOSSES the steps seen so far.
    Returns None when there are too few points to fit.
    """
    from scipy.optimize import least_squares

    n = len(train_losses)
    if n < 20:
        return None
    s1, s2 = schedule_areas(np.asarray(lrs, dtype=np.float64))
    # Skip the first 10% of observed steps (warmup transients), then average into bins: the
    # per-step loss is noisy and nearly independent step to step, so bin means have honest errors.
    start = max(1, n // 10)
    idx = np.array_split(np.arange(start, n), min(bins, n - start))
    x1 = np.array([s1[i].mean() for i in idx])
    x2 = np.array([s2[i].mean() for i in idx])
    y = np.array([np.mean([train_losses[j] for j in i]) for i in idx])

    def resid(p):
        return law(x1, x2, p[0], math.exp(p[1]), p[2], p[3]) - y

    best = None
    for alpha0 in (0.3, 0.6, 1.0):
        p0 = [max(0.0, y.min() - 0.5), math.log(max(1e-3, y[0] - y.min() + 0.5)), alpha0, 0.1]
        try:
            r = least_squares(resid, p0, bounds=([0, -10, 0.01, 0], [y.min(), 10, 3, 100]))
        except ValueError:
            continue
        if best is None or r.cost < best.cost:
            best = r
    if best is None:
        return None
    p = best.x
    final = float(law(s1[-1], s2[-1], p[0], math.exp(p[1]), p[2], p[3])) + val_gap
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
    return Prediction(tokens_seen, final, final - 1.96 * se, final + 1.96 * se)


def _unpack(p):
    return p[0], math.exp(p[1]), p[2], p[3]


def is_stable(history: list[Prediction]) -> bool:
    if len(history) < STABLE_COUNT:
        return False
    last = [h.final_loss for h in history[-STABLE_COUNT:]]
    spread = (max(last) - min(last)) / abs(last[-1])
    return spread < STABLE_TOL and history[-1].half_width / abs(history[-1].final_loss) < STABLE_TOL
