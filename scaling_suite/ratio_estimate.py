"""The finished runs a study predictor reads (`Reference`), and its first estimate: how much of a run's
loss is still to go at schedule progress p, read off what its finished siblings still had to go.

The estimate is log(final / loss at p) at this run, read off a weighted line through the reference
runs' log ratios (`_local_linear`) in (log N_nonembed, log D) and, where it predicts better, the log
loss at p itself (the level: a run still high at p has more of its drop ahead), with Gaussian weights
on the distance (`kernel_weights`). The bandwidth and the level's weight are chosen per prediction
by leave-one-out cross-validation over the reference runs themselves (`select`). earlystop's note
above ratio_prediction says why a ratio; docs/isoflop-and-prediction.md holds the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

BANDWIDTH = 0.5        # with 2 reference runs (nothing to cross-validate): a factor 2 away weighs 0.38
# The candidates `select` chooses from. Bandwidths in natural-log units of size and D; inf: every
# reference run alike (one line through all): from "the nearest runs only" to "a global trend".
BANDWIDTHS = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, math.inf)
# The level's weight: its coordinate is weight x log(reference's loss at p / this run's); 0: not used.
# At 10, a loss 10% apart at p counts as far as a factor e in size.
LEVELS = (0.0, 5.0, 10.0)
RIDGE = 0.1            # on the local line's slopes in log size and log D (_local_linear)


@dataclass(frozen=True)
class Reference:
    """Validation curves of finished runs of one schedule: per run (progress = tokens / D, loss,
    final loss, N, D, lr multipliers per step or None, peak lr, N_nonembed or NaN: the size the
    kernel weighs by). Immutable: `add` returns a new one."""
    curves: tuple = ()

    def __len__(self) -> int:
        return len(self.curves)

    def add(self, progress, loss, final: float, N: float, D: float, lrs=None, peak_lr: float = math.nan,
            N_nonembed: float = math.nan) -> "Reference":
        """LRS: the run's learning rate at every optimizer step and PEAK_LR its peak (the lr setting);
        without them the run serves the ratio estimate only. N_nonembed: the kernel's size (`offsets`)."""
        p, y = np.asarray(progress, dtype=float), np.asarray(loss, dtype=float)
        keep = np.isfinite(p) & np.isfinite(y) & (p > 0) & (y > 0)
        if keep.sum() < 2 or not (math.isfinite(final) and final > 0 and N > 0 and D > 0):
            return self
        order = np.argsort(p[keep])
        mult, peak = normalized(lrs, peak_lr)
        return Reference(self.curves + ((p[keep][order], y[keep][order], float(final), float(N), float(D),
                                         mult, peak, _known(N_nonembed)),))

    def log_losses(self, p: float) -> np.ndarray:
        """log(loss at progress p) of each reference run (interpolated in log loss)."""
        return np.array([float(np.interp(p, c[0], np.log(c[1]))) for c in self.curves])

    def log_finals(self) -> np.ndarray:
        """log(final loss) of each reference run."""
        return np.array([math.log(c[2]) for c in self.curves])

    def log_ratios(self, p: float) -> np.ndarray:
        """log(final / loss at progress p) of each reference run."""
        return self.log_finals() - self.log_losses(p)

    def offsets(self, N: float, D: float, N_nonembed: float = math.nan) -> np.ndarray:
        """Each reference run's (log(size / this size), log(D / this D)), size = N_nonembed (earlystop's
        note says why) where this run and every reference run have it, else N for all: one convention
        in one distance."""
        ne = _known(N_nonembed)
        col, size = (7, ne) if math.isfinite(ne) and all(math.isfinite(c[7]) for c in self.curves) else (3, N)
        return np.array([(math.log(c[col] / size), math.log(c[4] / D)) for c in self.curves]).reshape(-1, 2)

    def same_model(self, N: float, peak: float) -> list:
        """The reference runs of size N trained at the same peak lr (with a known schedule): the same
        model under another schedule length."""
        return [c for c in self.curves if c[5] is not None and c[3] == N and math.isclose(c[6], peak, rel_tol=1e-9)]


def kernel_weights(offsets: np.ndarray, bandwidth: float = BANDWIDTH) -> np.ndarray:
    """Gaussian weights (summing to 1) on each reference run's distance in log space (Reference.offsets);
    equal weights for an infinite bandwidth."""
    d2 = (offsets ** 2).sum(axis=1)
    w = np.exp(-(d2 - d2.min()) / (2 * bandwidth ** 2))    # shifted: far-only references do not underflow
    return w / w.sum()


def log_ratio(r: np.ndarray, offsets: np.ndarray, level: np.ndarray, bandwidth: float | None = None
              ) -> tuple[float, float]:
    """(m, half): the log ratio at this run (where OFFSETS, in log size and log D, are measured from)
    off the references' log ratios R, and the half-width of its 95% prediction interval for one new
    run (inf: nothing measured). LEVEL: each reference's log loss at p minus this run's. BANDWIDTH
    None: bandwidth and level weight chosen by `select`; given: that bandwidth without the level (the
    eleventh session's predictor, kept for comparison).

    The interval, where `select` chose: t s sqrt(1 + |l|^2), s^2 the mean squared leave-one-out error
    of the chosen setting over the k references (out-of-sample errors of this method on the finished
    runs), |l|^2 (l the line's weights on the references: m = l . r) widening it where the estimate
    rests on few of them (a design's edge), t Student's 97.5% quantile at k - 1 degrees of freedom.
    A rule whose errors offset, not a derivation: each leave-one-out error already holds the line's
    own error (so |l|^2 counts it twice), s^2 is the least of the candidates' (biased low), and the k
    errors are not independent. Measured: 92-96% of new runs inside in simulation, 92-100% on real
    studies; without the |l|^2 term 86-100% (docs/isoflop-and-prediction.md, "The bandwidth and the
    level"). The line's own residuals cannot serve once the bandwidth is chosen: a narrow chosen
    bandwidth leaves a handful of effective references and intervals of several hundred percent.

    With a given bandwidth, or fewer than 3 references: m +- t s sqrt(1 + |l|^2) with s^2 = sum w e^2 /
    nu_w from the residuals e of the weighted fit H, nu_w = sum w (1 - 2 h_ii + (H H')_ii) (unbiased;
    for a mean 1 - sum w^2, the ninth session's form: docs/isoflop-and-prediction.md, "The
    interval"), t at nu_w / sum w^2 degrees of freedom (1 / sum w^2: the effective number of
    references, Kish 1965). Where the line nearly passes through its few references there is no
    spread left to measure: no upper end."""
    chosen = select(r, offsets, level) if bandwidth is None else None
    bandwidth, weight, cv_mse = chosen if chosen else (bandwidth, 0.0, math.nan)
    X = _positions(offsets, level, weight)
    w = kernel_weights(X, bandwidth)
    m, resid, dof, lever = _local_linear(r, w, X)
    if math.isfinite(cv_mse):
        return m, float(student_t.ppf(0.975, len(r) - 1) * math.sqrt(cv_mse * (1 + lever)))
    if dof <= 1e-9:
        return m, math.inf
    return m, float(student_t.ppf(0.975, dof / float(w @ w)) * math.sqrt(float(w @ resid ** 2) / dof * (1 + lever)))


def _positions(offsets: np.ndarray, level: np.ndarray, weight: float) -> np.ndarray:
    """The coordinates the kernel and the line use: OFFSETS, and the weighted LEVEL unless its weight is 0."""
    return np.column_stack([offsets, weight * np.asarray(level, dtype=float)]) if weight else np.asarray(offsets)


def select(r: np.ndarray, offsets: np.ndarray, level: np.ndarray) -> tuple[float, float, float]:
    """(bandwidth, level weight, mean squared error) of the setting of BANDWIDTHS x LEVELS whose local
    line best predicts each reference run's log ratio R from the others' (least-squares leave-one-out
    cross-validation, Härdle & Marron 1985; the first candidate on a tie), the references placed at
    OFFSETS and LEVEL (any origin). (BANDWIDTH, 0, nan) with fewer than 3 references (leaving one of
    two out, every choice gives the other's ratio) or no finite score.

    Why chosen, not fixed: a study's spacing is its design's. An adaptive study's runs lie a factor
    1.2-1.5 apart and the nearest tell most; an n_sweep's sizes lie 3-5x apart at one D, where a
    bandwidth of 0.5 weighs one neighbour and extrapolates its noise (a fresh n_sweep: median 4.3%,
    max 8.0% error from 25%, 1.6% / 2.5% chosen). The level helps where runs of a size or depth start
    slower than their neighbours (the depth-3 48.4k runs of a quick WSD study stood 17% above the
    depth-2 35k run at 25% of the same D and ended level with it: 11.6% error without it, 6.3% with)
    and not where the loss at p is only noise: there the cross-validation leaves it out
    (docs/isoflop-and-prediction.md, "The bandwidth and the level")."""
    k = len(r)
    if k < 3:
        return BANDWIDTH, 0.0, math.nan
    others = ~np.eye(k, dtype=bool)
    best, choice = math.inf, (BANDWIDTH, 0.0)
    for weight in LEVELS:
        X = _positions(offsets, level, weight)
        rel = X[None, :, :] - X[:, None, :]            # rel[j, i]: run i's offset from run j
        d2 = (rel ** 2).sum(axis=2)
        near = np.where(others, d2, np.inf).min(axis=1, keepdims=True)
        d2 = np.where(others, d2, near) - near        # shifted as kernel_weights does; the diagonal is dropped
        Z = np.concatenate([np.ones((k, k, 1)), rel], axis=2)
        P = np.diag([0.0] + [RIDGE] * X.shape[1])
        for h in BANDWIDTHS:
            w = np.where(others, np.exp(-d2 / (2 * h ** 2)), 0.0)
            w /= w.sum(axis=1, keepdims=True)
            A = np.einsum("jia,ji,jib->jab", Z, w, Z) + P
            b = np.einsum("jia,ji,i->ja", Z, w, r)
            pred = np.linalg.solve(A, b[:, :, None])[:, 0, 0]   # each line's intercept: its value at run j
            score = float(np.mean((pred - r) ** 2))
            if score < best * (1 - 1e-9):
                best, choice = score, (h, weight)
    return (*choice, best) if math.isfinite(best) else (BANDWIDTH, 0.0, math.nan)


def _local_linear(r: np.ndarray, w: np.ndarray, offsets: np.ndarray):
    """(m, residuals, weighted residual dof, |l|^2): the log ratio m at this run off a line in its
    coordinates (log size, log D[, level]) through the references' log ratios r with weights w (local-linear
    regression, Fan & Gijbels 1996 §3.2.5): the drop after p grows with D at a fixed size, so for a
    size's shortest or longest run a mean of one-sided neighbours is biased. RIDGE on the slopes:
    docs/isoflop-and-prediction.md, "Local-linear". log_ratio's docstring: the rest."""
    X = np.column_stack([np.ones_like(r), offsets])
    B = np.linalg.solve(X.T @ (w[:, None] * X) + np.diag([0.0] + [RIDGE] * offsets.shape[1]), X.T * w)  # beta = B r
    H = X @ B
    dof = float(w @ (1 - 2 * np.diag(H) + (H ** 2).sum(axis=1)))
    return float(B[0] @ r), r - H @ r, dof, float(B[0] @ B[0])


def _known(N_nonembed) -> float:
    """N_nonembed as a float when known (> 0), else NaN."""
    ne = float(N_nonembed) if isinstance(N_nonembed, (int, float, np.number)) else math.nan
    return ne if math.isfinite(ne) and ne > 0 else math.nan


def normalized(lrs, peak_lr: float):
    """(per-step lr / peak, peak), or (None, nan) without a usable schedule. The peak is the run's
    lr setting, not the largest lr seen: a logged history thinned to every few steps can miss it."""
    if lrs is None or not (math.isfinite(peak_lr) and peak_lr > 0):
        return None, math.nan
    a = np.asarray(lrs, dtype=float)
    if a.size == 0 or not np.all(np.isfinite(a)):
        return None, math.nan
    return a / peak_lr, float(peak_lr)
