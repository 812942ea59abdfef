"""Planted-law data sets: known parameters in, runs out. Used by tests and benchmarks/calibration.py,
and handy for checking a pipeline end to end before spending compute on real runs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import laws

# A plausible planted law (Hoffmann et al. 2022 App. D.2 eq. 10 rounded, with B raised so that the
# two terms matter about equally over the design below).
PLANTED = {"E": 1.7, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.3}


def isoflop_runs(params=None, budgets=(1e18, 1e19, 1e20, 1e21), n_per_budget=7, width=1.0,
                 noise=0.0, seed=0, flops_per_token_factor=6.0) -> pd.DataFrame:
    """IsoFLOP design (Hoffmann et al. 2022 §3.2): per budget C, n_per_budget sizes log-spaced over
    +-width decades around the planted compute-optimal N, D = C / (6 N), and loss from the
    Chinchilla law times exp(noise * standard normal) (noise is the s.d. of log loss).
    Columns: N, D, C, C_budget, loss."""
    p = dict(PLANTED if params is None else params)
    rows = []
    for C in budgets:
        n_opt, _ = laws.chinchilla_optimal(C, **p, flops_per_token_factor=flops_per_token_factor)
        for N in np.logspace(np.log10(n_opt) - width, np.log10(n_opt) + width, n_per_budget):
            rows.append((N, C / (flops_per_token_factor * N), C, C))
    df = pd.DataFrame(rows, columns=["N", "D", "C", "C_budget"])
    rng = np.random.default_rng(seed)
    loss = laws.chinchilla(df["N"].to_numpy(), df["D"].to_numpy(), **p)
    df["loss"] = loss * np.exp(noise * rng.standard_normal(len(df)))
    return df


def parabola_runs(budgets=(1e18, 1e19, 1e20, 1e21), a=0.5, G=0.1, n_per_budget=7, width=1.0,
                  curvature=0.02, l_inf=1.7, l_slope=0.05) -> pd.DataFrame:
    """Runs whose loss is exactly a parabola in log N at each budget, with its minimum planted at
    N* = G C^a and L* = l_inf + C^-l_slope: approach 2 (Hoffmann et al. 2022 §3.2) must recover
    N* and a exactly. Columns: N, D, C, C_budget, loss."""
    rows = []
    for C in budgets:
        n_star = G * C ** a
        for N in np.logspace(np.log10(n_star) - width, np.log10(n_star) + width, n_per_budget):
            loss = l_inf + C ** -l_slope + curvature * np.log(N / n_star) ** 2
            rows.append((N, C / (6.0 * N), C, C, loss))
    return pd.DataFrame(rows, columns=["N", "D", "C", "C_budget", "loss"])


def learning_curves(sizes=(1e5, 3e5, 1e6), tokens_per_param=40, n_points=40, params=None,
                    flops_per_token_factor=6.0) -> pd.DataFrame:
    """Long-format curves (run_id, N, step, tokens, flops, train_loss, val_loss, lr) following the
    Chinchilla law at every step (loss after t tokens of a run planned for D tokens is taken as
    L(N, t): the envelope construction of Hoffmann et al. §3.1 then has a known answer)."""
    p = dict(PLANTED if params is None else params)
    frames = []
    for i, N in enumerate(sizes):
        D = tokens_per_param * N
        t = np.logspace(np.log10(D) - 2, np.log10(D), n_points)
        loss = laws.chinchilla(N, t, **p)
        frames.append(pd.DataFrame({
            "run_id": f"run{i}", "N": N, "step": t.round().astype(np.int64), "tokens": t,
            "flops": flops_per_token_factor * N * t, "train_loss": loss, "val_loss": loss,
            "lr": 1e-3}))
    return pd.concat(frames, ignore_index=True)


def isoflop_curves(params=None, budgets=tuple(np.logspace(17, 19, 5)), n_per_budget=5, width=0.5,
                   n_points=30, gap=0.0, flops_per_token_factor=6.0) -> pd.DataFrame:
    """Learning curves of an IsoFLOP design, one horizon per (size, budget) as an adaptive or grid
    study trains them: per budget, n_per_budget sizes over +-width decades around the planted
    optimum, each run's loss after t of its D tokens L(N, t) + gap * (1 + cos(pi t / D)) / 2 (gap:
    what a run still lacks mid-cosine, zero at its end). Columns as learning_curves, plus D."""
    p = dict(PLANTED if params is None else params)
    frames = []
    for C in budgets:
        n_opt, _ = laws.chinchilla_optimal(C, **p, flops_per_token_factor=flops_per_token_factor)
        for N in np.logspace(np.log10(n_opt) - width, np.log10(n_opt) + width, n_per_budget):
            D = C / (flops_per_token_factor * N)
            t = np.logspace(np.log10(D) - 2, np.log10(D), n_points)
            loss = laws.chinchilla(N, t, **p) + gap * (1 + np.cos(np.pi * t / D)) / 2
            frames.append(pd.DataFrame({
                "run_id": f"C{C:.3g}-N{N:.4g}", "N": N, "D": D, "step": t.round().astype(np.int64), "tokens": t,
                "flops": flops_per_token_factor * N * t, "train_loss": loss, "val_loss": loss, "lr": 1e-3}))
    return pd.concat(frames, ignore_index=True)


def undertrained_isoflop_runs(params=None, budgets=tuple(np.logspace(18, 21, 7)),
                              sizes=tuple(np.logspace(7.5, 10.5, 13)), batch_tokens=2.0 ** 19,
                              k_steps=60.0, noise=0.0, seed=0, flops_per_token_factor=6.0) -> pd.DataFrame:
    """IsoFLOP profiles that are NOT parabolas in log N: the Chinchilla law plus an undertraining
    term k_steps / steps, steps = D / batch_tokens with one fixed batch, so the loss climbs steeply
    where a large model gets few optimizer steps (real profiles are asymmetric this way). Every
    budget trains the same fixed list of sizes, so the optimum drifts across the grid from budget to
    budget. Loss times exp(noise * standard normal). Columns: N, D, C, C_budget, loss."""
    p = dict(PLANTED if params is None else params)
    N, C = np.meshgrid(np.asarray(sizes, dtype=float), np.asarray(budgets, dtype=float))
    N, C = N.ravel(), C.ravel()
    D = C / (flops_per_token_factor * N)
    loss = undertrained_loss(N, D, p, batch_tokens, k_steps)
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"N": N, "D": D, "C": C, "C_budget": C,
                         "loss": loss * np.exp(noise * rng.standard_normal(N.size))})


def undertrained_loss(N, D, params, batch_tokens, k_steps):
    """Chinchilla law (Hoffmann et al. 2022 §3.3 eq. 2) + k_steps / (D / batch_tokens)."""
    return laws.chinchilla(N, D, **params) + k_steps * batch_tokens / np.asarray(D, dtype=float)


def undertrained_optimum(C, params=None, batch_tokens=2.0 ** 19, k_steps=60.0,
                         flops_per_token_factor=6.0) -> float:
    """The true N* of undertrained_loss at budget C, found numerically (bounded 1-D minimisation in
    log N; the profile is smooth and unimodal in log N)."""
    from scipy.optimize import minimize_scalar   # lazy heavy library: only this test-data helper needs it

    p = dict(PLANTED if params is None else params)

    def f(lN):
        N = np.exp(lN)
        return float(undertrained_loss(N, C / (flops_per_token_factor * N), p, batch_tokens, k_steps))

    n0, _ = laws.chinchilla_optimal(C, **p, flops_per_token_factor=flops_per_token_factor)
    r = minimize_scalar(f, bounds=(np.log(n0) - 8, np.log(n0) + 8), method="bounded",
                        options={"xatol": 1e-10})
    return float(np.exp(r.x))
