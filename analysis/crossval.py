"""How well a fit predicts points it did not see: leave-one-out errors and the largest sizes held out."""

from __future__ import annotations

import numpy as np

from scaling_suite.errors import SuiteError

from . import optim
from .common import check_positive, jsonable
from .fit import fit_chinchilla, fit_kaplan, fit_power_law
from .result import FitResult, fit_inputs


def _refit(fit: FitResult, inputs, loss) -> FitResult:
    """The same fit (model, delta, grid) on other data, without bootstrap."""
    grid = None if fit.grid in (None, "custom") else fit.grid
    delta = fit.delta if fit.delta is not None else 1e-3
    if fit.model == "power_law":
        return fit_power_law(inputs[0], loss, fixed_E=fit.fixed_E, grid=grid, delta=delta, x_name=fit.x_name or "x")
    fitter = fit_chinchilla if fit.model == "chinchilla" else fit_kaplan
    return fitter(inputs[0], inputs[1], loss, grid=grid, delta=delta)


def loo_errors(fit: FitResult, *inputs, loss) -> np.ndarray:
    """Leave-one-out relative prediction errors (L_hat_-i(x_i) - L_i) / L_i, one per point.

    Each fold is the same weighted Huber problem with point i's weight set to 0, so all folds run
    as one batch. Folds start from the full-data optimum and the other local optima of `fit`
    (a deliberate shortcut, as for the bootstrap: dropping one of n points moves the optimum only
    slightly); the full grid is not rerun per fold.
    """
    model, arrs, y = fit_inputs(fit, inputs, loss)
    n = y.size
    if n - 1 < len(model.coords):
        raise SuiteError(f"leave-one-out needs at least {len(model.coords) + 1} points, got {n}")
    logs, logy = tuple(np.log(a) for a in arrs), np.log(y)
    starts = np.asarray(fit.local_optima, dtype=float)[:4]
    delta = fit.delta if fit.delta is not None else 1e-3
    pred = np.empty(n)
    per_batch = max(1, 2_000_000 // n)          # bound the (folds x n) weight matrix to ~16 MB
    for lo in range(0, n, per_batch):
        folds = np.arange(lo, min(n, lo + per_batch))
        w = np.ones((folds.size, n))
        w[np.arange(folds.size), folds] = 0.0
        X, _, _ = optim.grouped_refits(
            lambda ww, g: optim.huber_objective(model, logs, logy, delta, ww, g), w, starts,
            f_floor=optim.exact_fit_floor(n))
        # Each fold's law at its own left-out point, in log space (a degenerate fold's amplitude can
        # overflow as a float, and inf * 0 would make its prediction NaN).
        with np.errstate(all="ignore"):
            logpred = model.forward(X, model.prepare(logs))[0]
        pred[folds] = np.exp(logpred[np.arange(folds.size), folds])
    return (pred - y) / y


def holdout_largest(fit: FitResult, *inputs, loss, by: str = "N", C=None, rel_tol: float = 0.01) -> dict:
    """Refit without the points at the largest N (or D, or C), predict them, report relative errors.

    "Largest" means within rel_tol of the maximum (reconstructed data jitter by ~1e-6). For
    two-input fits C defaults to 6 N D (Kaplan et al. 2020 §2.1); pass the measured C if known.
    A fresh grid fit is used (no warm start from `fit`, which saw the held-out points).
    """
    model, arrs, y = fit_inputs(fit, inputs, loss)
    named = dict(zip(model.inputs, arrs))
    if len(arrs) == 2:
        named["C"] = check_positive("C", C, y.size) if C is not None else 6.0 * arrs[0] * arrs[1]
        if by not in named:
            raise SuiteError(f"by must be one of {sorted(named)}, got {by!r}")
        key = named[by]
    else:
        key, by = arrs[0], fit.x_name or "x"
    held = key >= key.max() / (1.0 + rel_tol)
    n_train = int((~held).sum())
    if n_train < len(model.coords):
        raise SuiteError(f"holding out the largest {by} leaves {n_train} point(s), fewer than "
                         f"the {len(model.coords)} parameters of {fit.model}")
    refit = _refit(fit, [a[~held] for a in arrs], y[~held])
    pred = refit.predict(*[a[held] for a in arrs])
    rel = (pred - y[held]) / y[held]
    return jsonable({
        "by": by, "threshold": float(key.max() / (1.0 + rel_tol)), "n_train": n_train,
        "n_heldout": int(held.sum()), "max_train": float(key[~held].max()),
        "rel_errors": rel, "mean_abs_rel_error": float(np.mean(np.abs(rel))),
        "max_abs_rel_error": float(np.max(np.abs(rel))), "params": refit.params})
