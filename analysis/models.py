"""Scaling laws in the log-space coordinates the optimiser works in, with analytic gradients.

Fitting log L rather than L (Hoffmann et al. 2022 App. D.2) makes relative errors count equally at
every scale, and writing each positive coefficient as exp(.) makes E, A, B > 0 without bounds. A model
here is: its optimiser coordinates, a map to the natural parameters of `laws.py`, a start grid, and
``forward(X, logs) -> (pred, vjp)`` giving log L_hat for a batch of parameter rows X (k, P) and a
function mapping per-point weights v (k, n) to sum_i v_i d pred_i / d theta (k, P). Both are written
with in-place numpy operations on row blocks (the objective in optim.py calls them block by block):
vjp may overwrite v and the forward's buffers, and must be called at most once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import laws


def _ones_and(col):
    """[1, col] as an (n, 2) matrix, so one matmul gives both sum(w) and sum(w * col)."""
    return np.column_stack([np.ones_like(col), col])


def _prepare_pairs(logs):
    """Per-fit constants: each log input with its [1, -log x] matrix for the gradient matmuls."""
    return tuple((lx, _ones_and(-lx)) for lx in logs)


@dataclass(frozen=True)
class LogModel:
    name: str
    inputs: tuple[str, ...]             # names of the data arrays, e.g. ("N", "D")
    coords: tuple[str, ...]             # optimiser coordinates, e.g. ("a", "b", "e", "alpha", "beta")
    params: tuple[str, ...]             # natural parameters, as in laws.py
    to_natural: Callable[[np.ndarray], np.ndarray]
    forward: Callable                   # (X (k,P), prepare(logs)) -> (pred (k,n), vjp)
    default_grid: Callable              # (logs, logy) -> (S, P) starts in optimiser coordinates
    law: Callable                       # natural-parameter law from laws.py: law(*inputs, **params)
    fixed: dict                         # natural parameters held fixed (e.g. {"E": 0.0})
    prepare: Callable = _prepare_pairs  # logs -> per-fit constants handed to forward

    def natural(self, X: np.ndarray) -> dict:
        with np.errstate(over="ignore"):    # exp(log A) of a degenerate fit is inf: reported, not raised
            Z = self.to_natural(np.atleast_2d(X))
        out = {k: Z[:, i] for i, k in enumerate(self.params)}
        out.update({k: np.full(Z.shape[0], v) for k, v in self.fixed.items()})
        return out


def _lse(*T):
    """Row-wise log-sum-exp of equally shaped terms, overwriting each T with exp(T - max).

    Returns (log sum, Z = sum of the shifted exponentials); the shifted exponentials left in T are
    the softmax numerators the gradients need. Subtracting the max keeps every exp() in (0, 1].
    """
    m = np.maximum(T[0], T[1])
    for t in T[2:]:
        np.maximum(m, t, out=m)
    for t in T:
        t -= m
        np.exp(t, out=t)
    Z = T[0] + T[1]
    for t in T[2:]:
        Z += t
    out = np.log(Z)
    out += m
    return out, Z


def _outer_affine(c0, slope, lx):
    """c0 - slope * lx for column vectors c0, slope (k, 1) and a row lx (n,), as a fresh (k, n)."""
    T = np.multiply.outer(-slope[:, 0], lx)
    T += c0
    return T


# --- Chinchilla (Hoffmann et al. 2022 §3.3 eq. 2; App. D.2 log-space form) ----------------------

def _chinchilla_forward(X, data):
    (lN, MN), (lD, MD) = data
    a, b, e, alpha, beta = (X[:, i:i + 1] for i in range(5))
    # log L_hat = logsumexp(a - alpha log N, b - beta log D, e)   (App. D.2)
    T1, T2 = _outer_affine(a, alpha, lN), _outer_affine(b, beta, lD)
    T3 = np.repeat(e, lN.size, axis=1)
    pred, Z = _lse(T1, T2, T3)

    def vjp(v):
        v /= Z                                  # v_i * d(log sum)/d(term) = v_i * exp(T - m) / Z
        np.multiply(T1, v, out=T1)
        np.multiply(T2, v, out=T2)
        gN = T1 @ MN                            # [sum w1, -sum w1 log N] in one BLAS pass
        gD = T2 @ MD
        ge = np.einsum("ij,ij->i", v, T3)
        return np.column_stack([gN[:, 0], gD[:, 0], ge, gN[:, 1], gD[:, 1]])
    return pred, vjp


def published_grid() -> np.ndarray:
    """Hoffmann et al. 2022 App. D.2 start grid (as replicated by Besiroglu et al. 2024 §2):
    alpha, beta in {0, .5, 1, 1.5, 2}, e in {-1, -.5, 0, .5, 1}, a, b in {0, 5, ..., 25}: 4,500 starts,
    returned in optimiser order (a, b, e, alpha, beta)."""
    ab = np.arange(0.0, 30.0, 5.0)
    ee = np.arange(-1.0, 1.5, 0.5)
    al = np.arange(0.0, 2.5, 0.5)
    return np.array(list(itertools.product(ab, ab, ee, al, al)), dtype=float)


def coarse_grid() -> np.ndarray:
    """A 3^5 = 243-start subset-spaced grid for quick looks (same ranges as the published one)."""
    return np.array(list(itertools.product([0.0, 10.0, 20.0], [0.0, 10.0, 20.0], [-1.0, 0.0, 1.0],
                                           [0.0, 0.5, 1.0], [0.0, 0.5, 1.0])), dtype=float)


def _chinchilla_natural(X):
    a, b, e, alpha, beta = X.T
    return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)


CHINCHILLA = LogModel(
    name="chinchilla", inputs=("N", "D"), coords=("a", "b", "e", "alpha", "beta"),
    params=("E", "A", "B", "alpha", "beta"), to_natural=_chinchilla_natural,
    forward=_chinchilla_forward, default_grid=lambda logs, logy: published_grid(),
    law=laws.chinchilla, fixed={})


# --- Saturating power law L = E + A x^-alpha (Kaplan et al. 2020 §1.2 with Hoffmann's offset E) -

def _data_starts(lx, logy, alphas, e_values):
    """Starts that pass through the median data point: a = log(L_med - E) + alpha log x_med.

    The data set the scale of a (log A ~ alpha log x can be 50 for x = C ~ 1e23), so a grid fixed
    in absolute terms would miss it; anchoring at the data keeps the grid meaningful at any scale.
    """
    lx_med, y_med = np.median(lx), np.exp(np.median(logy))
    rows = []
    for alpha, e in itertools.product(alphas, e_values):
        gap = y_med - np.exp(e)
        if gap > 0:
            rows.append((np.log(gap) + alpha * lx_med, e, alpha))
    return np.array(rows, dtype=float).reshape(-1, 3)


def power_law_model(fixed_E: float | None = None) -> LogModel:
    """Power law with free E >= 0 (coords a, e, alpha) or E held fixed (coords a, alpha)."""
    if fixed_E is None:
        def forward(X, data):
            ((lx, M),) = data
            a, e, alpha = X[:, 0:1], X[:, 1:2], X[:, 2:3]
            T1, T2 = _outer_affine(a, alpha, lx), np.repeat(e, lx.size, axis=1)
            pred, Z = _lse(T1, T2)

            def vjp(v):
                v /= Z
                np.multiply(T1, v, out=T1)
                g1 = T1 @ M
                return np.column_stack([g1[:, 0], np.einsum("ij,ij->i", v, T2), g1[:, 1]])
            return pred, vjp

        def grid(logs, logy):
            (lx,) = logs
            # The published grid's pattern (e, a, alpha) plus data-anchored starts.
            g = np.array(list(itertools.product(np.arange(0.0, 30.0, 5.0), np.arange(-1.0, 1.5, 0.5),
                                                np.arange(0.0, 2.5, 0.5))), dtype=float)
            e_vals = np.log(np.exp(logy.min()) * np.array([0.05, 0.3, 0.6, 0.8, 0.95]))
            anchored = _data_starts(lx, logy, [0.03, 0.07, 0.15, 0.3, 0.6, 1.0], e_vals)
            return np.vstack([g, anchored])

        return LogModel(
            name="power_law", inputs=("x",), coords=("a", "e", "alpha"), params=("E", "A", "alpha"),
            to_natural=lambda X: np.stack([np.exp(X[:, 1]), np.exp(X[:, 0]), X[:, 2]], axis=1),
            forward=forward, default_grid=grid, law=laws.power_law, fixed={})

    if fixed_E < 0:
        raise ValueError("fixed_E must be >= 0")
    log_E = np.log(fixed_E) if fixed_E > 0 else None

    def forward_fixed(X, data):
        ((lx, M),) = data
        a, alpha = X[:, 0:1], X[:, 1:2]
        T = _outer_affine(a, alpha, lx)
        if log_E is None:   # pure power law: log L = a - alpha log x, linear in the coordinates
            return T, lambda v: v @ M
        pred, Z = _lse(T, np.full_like(T, log_E))

        def vjp(v):
            v /= Z
            v *= T
            return v @ M
        return pred, vjp

    def grid_fixed(logs, logy):
        (lx,) = logs
        e_vals = [log_E] if log_E is not None else [-np.inf]
        anchored = _data_starts(lx, logy, [0.0, 0.03, 0.07, 0.15, 0.3, 0.6, 1.0, 1.5, 2.0], e_vals)
        return anchored[:, [0, 2]]

    return LogModel(
        name="power_law", inputs=("x",), coords=("a", "alpha"), params=("A", "alpha"),
        to_natural=lambda X: np.stack([np.exp(X[:, 0]), X[:, 1]], axis=1),
        forward=forward_fixed, default_grid=grid_fixed, law=laws.power_law,
        fixed={"E": float(fixed_E)})


# --- Kaplan et al. 2020 §1.2 eq. (1.5) -----------------------------------------------------------

def _kaplan_forward(X, data):
    (lN, _), (lD, _) = data
    n_c, d_c, alpha_N, alpha_D = (X[:, i:i + 1] for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = alpha_N / alpha_D
        # log L = alpha_D * log( exp(r (log N_c - log N)) + exp(log D_c - log D) )
        dN = n_c - lN                               # log(N_c / N), (k, n)
        u1 = r * dN
        T1, T2 = u1.copy(), np.subtract(d_c, lD)
        S, Z = _lse(T1, T2)
        pred = alpha_D * S
    # The law is only defined for alpha_D > 0: report +inf so the line search steps back.
    pred = np.where(alpha_D > 0, pred, np.inf)

    def vjp(v):
        w1, w2 = v * T1 / Z, v * T2 / Z            # v times the softmax weights of the two terms
        return np.column_stack([
            w1.sum(1) * alpha_N[:, 0],                 # d/d log N_c = alpha_D w1 r = alpha_N w1
            w2.sum(1) * alpha_D[:, 0],                 # d/d log D_c = alpha_D w2
            np.einsum("ij,ij->i", w1, dN),             # d/d alpha_N = w1 log(N_c/N)
            np.einsum("ij,ij->i", v, S) - np.einsum("ij,ij->i", w1, u1),  # d/d alpha_D = S - w1 u1
        ])
    return pred, vjp


def _kaplan_grid(logs, logy):
    lN, lD = logs
    # With D -> inf the law is (N_c/N)^alpha_N, so log N_c = log N + log L / alpha_N; anchor the
    # grid at the data medians and spread it by factors of the implied offset.
    ly = np.median(logy)
    rows = []
    for aN, aD, fN, fD in itertools.product([0.04, 0.08, 0.16, 0.32], [0.04, 0.08, 0.16, 0.32],
                                            [0.5, 1.0, 2.0], [0.5, 1.0, 2.0]):
        rows.append((np.median(lN) + fN * ly / aN, np.median(lD) + fD * ly / aD, aN, aD))
    return np.array(rows, dtype=float)


KAPLAN = LogModel(
    name="kaplan", inputs=("N", "D"), coords=("n_c", "d_c", "alpha_N", "alpha_D"),
    params=("N_c", "D_c", "alpha_N", "alpha_D"),
    to_natural=lambda X: np.stack([np.exp(X[:, 0]), np.exp(X[:, 1]), X[:, 2], X[:, 3]], axis=1),
    forward=_kaplan_forward, default_grid=_kaplan_grid, law=laws.kaplan, fixed={})
