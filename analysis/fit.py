"""Robust scaling-law fits that return a frozen `FitResult` (lmfit-style: value, interval, report).

Every fitter works the same way (Hoffmann et al. 2022 App. D.2, made reproducible by Besiroglu et al.
2024, arXiv 2404.10102 §2): minimise the SUM over points of Huber_delta(log L_hat - log L) with
delta = 1e-3, by L-BFGS from every point of a start grid, keep the lowest objective. Intervals are
percentile bootstrap intervals over points resampled with replacement (Besiroglu et al. §3 use the
same, with 4,000 resamples). `optim.py` does the minimising; `models.py` holds the log-space laws.
Every fit also says whether the data identify each power-law term (`term_support`): an interval is
only as good as the term it bounds, and a term seen at one or two sizes has none worth the name.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.special import stdtrit   # Student t quantile; scipy.stats itself costs ~2 s to import

from scaling_suite.errors import SuiteError

from . import models, optim
from .common import check_positive, n_distinct, percentile_interval
from .result import FitResult, fit_inputs

# --- input checks: every problem is a one-line SuiteError ----------------------------------------

def _check_fit_args(n_points, n_params, model, delta, n_bootstrap, level):
    if n_points < n_params:
        raise SuiteError(f"{model} has {n_params} parameters but only {n_points} data point(s) were given")
    if not (np.isfinite(delta) and delta > 0):
        raise SuiteError(f"delta must be > 0, got {delta}")
    if int(n_bootstrap) < 0:
        raise SuiteError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0 < level < 1:
        raise SuiteError(f"level must be in (0, 1), got {level}")


# --- the shared engine ----------------------------------------------------------------------------

def _resolve_grid(model, grid, logs, logy):
    if grid is None or (isinstance(grid, str) and grid == "default"):
        return model.default_grid(logs, logy), "default"
    if isinstance(grid, str):
        if model.name == "chinchilla" and grid in ("published", "coarse"):
            return (models.published_grid() if grid == "published" else models.coarse_grid()), grid
        raise SuiteError(f"unknown grid {grid!r} for {model.name} (use 'published', 'coarse' or an array)")
    arr = np.asarray(grid, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != len(model.coords) or arr.shape[0] == 0:
        raise SuiteError(f"grid must be an array of shape (starts, {len(model.coords)}) in coordinates {model.coords}")
    return arr, "custom"


def _fit(model, inputs: dict, loss, *, grid, delta, n_bootstrap, seed, level, bootstrap_starts=4,
         **labels) -> FitResult:
    names = list(inputs)
    first = check_positive(names[0], inputs[names[0]])
    data = {names[0]: first}
    for k in names[1:]:
        data[k] = check_positive(k, inputs[k], first.size)
    y = check_positive("loss", loss, first.size)
    _check_fit_args(first.size, len(model.coords), model.name, delta, n_bootstrap, level)
    logs = tuple(np.log(data[k]) for k in names)
    logy = np.log(y)
    starts, grid_name = _resolve_grid(model, grid, logs, logy)
    floor = optim.exact_fit_floor(y.size)
    out = optim.multistart(optim.huber_objective(model, logs, logy, delta), starts, f_floor=floor)
    if out is None:
        raise SuiteError(f"{model.name} fit failed: the objective is not finite at any start")
    X, f, conv, n_at_best = out
    best = X[0]
    params = {k: float(v[0]) for k, v in model.natural(best).items()}
    params = {k: params[k] for k in _param_order(model)}
    data_range = {k: [float(v.min()), float(v.max())] for k, v in data.items()}
    if names == ["N", "D"]:
        C = 6.0 * data["N"] * data["D"]
        data_range["C"] = [float(C.min()), float(C.max())]
    support, unidentified = term_support(model, best, logs, logy, names)
    res = FitResult(model=model.name, params=params, objective=float(f[0]), n_points=int(y.size),
                    converged=bool(conv[0]), level=level, **labels, delta=delta, grid=grid_name,
                    n_starts=int(starts.shape[0]), n_at_best=n_at_best, coords=dict(zip(model.coords, best.tolist())),
                    local_optima=X[:8].tolist(), local_optima_objective=f[:8].tolist(), fixed=dict(model.fixed),
                    data_range=data_range, support=support, unidentified=unidentified)
    if n_bootstrap:
        return _bootstrap(res, model, logs, logy, int(n_bootstrap), seed, bootstrap_starts)
    return replace(res, stderr=_asymptotic_stderr(model, best, logs, logy),
                   stderr_method="asymptotic (Gauss-Newton on log residuals)")


def _bootstrap(fit: FitResult, model, logs, logy, n_bootstrap, seed, n_starts) -> FitResult:
    rng = np.random.default_rng(seed)
    n = logy.size
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(float)
    delta = fit.delta
    starts = np.asarray(fit.local_optima, dtype=float)[:n_starts]
    bx, _, bconv = optim.grouped_refits(
        lambda w, g: optim.huber_objective(model, logs, logy, delta, w, g), counts, starts,
        f_floor=optim.exact_fit_floor(n))
    samples = model.natural(bx)
    intervals = {k: tuple(float(v) for v in percentile_interval(samples[k], fit.level))
                 for k in fit.params if k not in model.fixed}
    with np.errstate(over="ignore", invalid="ignore"):     # draws of a degenerate term can be inf
        stderr = {k: float(np.std(samples[k], ddof=1)) for k in intervals}
    return replace(fit, intervals=intervals, stderr=stderr, n_bootstrap=n_bootstrap, samples=samples,
                   stderr_method="bootstrap", bootstrap_converged=float(bconv.mean()), seed=seed,
                   bootstrap_starts=int(starts.shape[0]))


def bootstrap(fit: FitResult, *inputs, loss, n_bootstrap: int = 1000, seed: int = 0,
              n_starts: int = 4) -> FitResult:
    """A copy of `fit` with percentile bootstrap intervals (at fit.level), bootstrap s.d. as stderr
    and the draws in `samples`: points resampled with replacement n_bootstrap times (Besiroglu et
    al. 2024 §3). A resample is the same Huber problem with multinomial point weights, so all of
    them are refitted in one batch, each from the full-data optimum and the next n_starts - 1
    distinct local optima the grid found (a resample moves the optimum only slightly, and rerunning
    the whole grid per resample would cost B times the grid fit)."""
    if int(n_bootstrap) < 1:
        raise SuiteError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    model, arrs, y = fit_inputs(fit, inputs, loss)
    return _bootstrap(fit, model, tuple(np.log(a) for a in arrs), np.log(y), int(n_bootstrap), seed,
                      n_starts)


def _param_order(model):
    order = {"chinchilla": ("E", "A", "B", "alpha", "beta"), "power_law": ("E", "A", "alpha")}
    return order.get(model.name, model.params)


def _asymptotic_stderr(model, best, logs, logy):
    """Least-squares approximation: cov = s^2 (J'J)^-1 in optimiser coordinates, mapped to natural
    parameters by the delta method. Only a guide (the Huber fit is closer to L1); prefer bootstrap."""
    n, P = logy.size, best.size
    if n <= P:
        return {k: float("nan") for k in model.params}
    data = model.prepare(logs)
    h = 1e-6 * (1.0 + np.abs(best))
    rows = np.vstack([best + np.diag(h), best - np.diag(h), best[None]])
    with np.errstate(all="ignore"):
        pred = model.forward(rows, data)[0]
        J = ((pred[:P] - pred[P:2 * P]) / (2 * h[:, None])).T          # (n, P)
        r = pred[-1] - logy
        s2 = float(r @ r) / (n - P)
        try:
            cov = s2 * np.linalg.inv(J.T @ J)
        except np.linalg.LinAlgError:
            return {k: float("nan") for k in model.params}
        Jn = (model.to_natural(rows[:P]) - model.to_natural(rows[P:2 * P])) / (2 * h[:, None])  # (P, P)
        var = np.diag(Jn.T @ cov @ Jn)
    return {k: float(np.sqrt(v)) if v >= 0 else float("nan") for k, v in zip(model.params, var)}


# --- identification: is each power-law term seen by the data? -------------------------------------

# A term A·x^-alpha has two parameters, and with the offset E three numbers set its shape, so the
# data pin it down only where it visibly changes across >= 3 distinct x. Seen changing at one or two
# sizes, amplitude and exponent trade off freely and the optimiser drifts to a step function: quick
# studies here fitted alpha = 24, 32 and 47 with A = 1e92..1e180 (and Kaplan alpha_N = 2.1) from runs
# whose losses differed by < 3%, with bootstrap intervals that looked tight. A term that is large but
# flat (alpha ~ 0) is no better: it trades off with E. So a term is seen at x when its contribution
# to the fitted log loss there (the law's other input at its median) exceeds its smallest
# contribution over the data by the threshold, and the x where it is smallest counts as the
# reference. The threshold is the larger of 1% (about the seed-to-seed spread of a final loss at
# quick's sizes, README "Precision") and the fit's RMS log residual.
MIN_SUPPORT = 3
SUPPORT_FLOOR = 0.01


def _term_shares(model, X, logs) -> dict:
    """exponent -> (input, amplitude, the term's contribution to log L at each point: log L minus
    log L without it, or log L itself for a pure power law), in the optimiser's log coordinates X
    (an amplitude of a degenerate fit can overflow as a float). In a two-input law the other input is
    held at its median, so a contribution varies with the term's own input only."""
    lse = np.logaddexp
    c = dict(zip(model.coords, X))
    if model.name == "chinchilla":
        lN, lD = logs
        tN, tD = c["a"] - c["alpha"] * lN, c["b"] - c["beta"] * lD
        tN0, tD0 = np.median(tN), np.median(tD)
        return {"alpha": ("N", "A", lse(tN, lse(c["e"], tD0)) - lse(c["e"], tD0)),
                "beta": ("D", "B", lse(tD, lse(c["e"], tN0)) - lse(c["e"], tN0))}
    if model.name == "kaplan":
        # log L = alpha_D log(u + v), u = (N_c/N)^(alpha_N/alpha_D), v = D_c/D (eq. 1.5).
        lN, lD = logs
        lu, lv = c["alpha_N"] / c["alpha_D"] * (c["n_c"] - lN), c["d_c"] - lD
        return {"alpha_N": ("N", "N_c", c["alpha_D"] * lse(0.0, lu - np.median(lv))),
                "alpha_D": ("D", "D_c", c["alpha_D"] * lse(0.0, lv - np.median(lu)))}
    if model.name == "power_law":
        (lx,) = logs
        t = c["a"] - c["alpha"] * lx
        E = model.fixed.get("E")
        le = c["e"] if E is None else (np.log(E) if E > 0 else None)
        return {"alpha": (model.inputs[0], "A", t if le is None else lse(t, le) - le)}
    return {}


def term_support(model, X, logs, logy, names) -> tuple[dict, dict]:
    """(support, unidentified) of a fit's power-law terms on its data (log inputs `logs` named
    `names`). support: exponent -> {input, amplitude, seen (distinct input values where the term's
    contribution to the log loss exceeds its smallest by >= threshold, plus that reference), distinct,
    threshold}; unidentified: exponent -> a one-line reason, for terms seen at fewer than MIN_SUPPORT."""
    with np.errstate(all="ignore"):
        resid = model.forward(np.asarray(X, dtype=float)[None], model.prepare(logs))[0][0] - logy
        shares = _term_shares(model, X, logs)
    rms = float(np.sqrt(np.mean(resid ** 2))) if np.all(np.isfinite(resid)) else np.inf
    thr = max(SUPPORT_FLOOR, rms)
    support, unidentified = {}, {}
    for exp_name, (inp, amp, share) in shares.items():
        i = model.inputs.index(inp)
        lx, inp = logs[i], names[i]
        share = np.nan_to_num(share, nan=0.0, posinf=0.0, neginf=0.0)
        moved = lx[share - share.min() >= thr]
        seen, distinct = (n_distinct(moved) + 1 if moved.size else 0), n_distinct(lx)
        support[exp_name] = {"input": inp, "amplitude": amp, "seen": seen, "distinct": distinct, "threshold": thr}
        if seen < MIN_SUPPORT:
            where = f" (it moves only at {inp} <= {np.exp(moved.max()):.3g})" if moved.size else ""
            unidentified[exp_name] = (
                f"{exp_name} and {amp} not identified: the {inp} term changes the fitted loss by >= {thr:.1%} across "
                f"only {seen} of {distinct} distinct {inp}{where}; a power law needs >= {MIN_SUPPORT}, so its "
                f"exponent and amplitude trade off freely (value and interval are not measurements)")
    return support, unidentified


# --- public fitters -------------------------------------------------------------------------------

def fit_chinchilla(N, D, loss, grid=None, delta=1e-3, n_bootstrap=0, seed=0, level=0.95,
                   bootstrap_starts=4) -> FitResult:
    """L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022 §3.3, App. D.2).

    grid: None or "published" = the 4,500-start grid; "coarse" = 243 starts; or an array of starts
    in coordinates (a, b, e, alpha, beta) = (log A, log B, log E, alpha, beta).
    Bootstrap refits start from the full-data optimum and the next `bootstrap_starts - 1` distinct
    local optima the grid found (not the whole grid: a resample moves the optimum only slightly).
    """
    return _fit(models.CHINCHILLA, {"N": N, "D": D}, loss, grid=grid, delta=delta,
                n_bootstrap=n_bootstrap, seed=seed, level=level, bootstrap_starts=bootstrap_starts)


def fit_power_law(x, loss, fixed_E=None, grid=None, delta=1e-3, n_bootstrap=0, seed=0, level=0.95,
                  x_name="x", bootstrap_starts=4) -> FitResult:
    """L(x) = E + A x^-alpha with E >= 0 free (fixed_E=None) or held at fixed_E (0 = pure power law,
    Kaplan et al. 2020 §1.2 eq. 1.1-1.3). For L(N), L(D), L(C) and learning curves L(tokens); x_name
    only labels the input in reports and data ranges."""
    if fixed_E is not None and not (np.isfinite(fixed_E) and fixed_E >= 0):
        raise SuiteError(f"fixed_E must be a number >= 0, got {fixed_E}")
    return _fit(models.power_law_model(fixed_E), {x_name: x}, loss, grid=grid, delta=delta,
                n_bootstrap=n_bootstrap, seed=seed, level=level, bootstrap_starts=bootstrap_starts,
                x_name=x_name, fixed_E=fixed_E)


def fit_kaplan(N, D, loss, grid=None, delta=1e-3, n_bootstrap=0, seed=0, level=0.95,
               bootstrap_starts=4) -> FitResult:
    """L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (Kaplan et al. 2020 §1.2 eq. 1.5,
    §4 eq. 4.1), fitted with the same log-space Huber multi-start as the Chinchilla form."""
    return _fit(models.KAPLAN, {"N": N, "D": D}, loss, grid=grid, delta=delta,
                n_bootstrap=n_bootstrap, seed=seed, level=level, bootstrap_starts=bootstrap_starts)


def fit_loglinear(x, y, level=0.95, x_name="x", y_name="y") -> FitResult:
    """log y = log k + s log x by ordinary least squares, with a t-interval on s and k.

    Used for allocation exponents (N_opt ∝ C^a, Hoffmann et al. 2022 §3.1-3.2): there the points are
    per-budget optima, few and already smoothed, so plain OLS with its textbook standard error is
    the right tool (Besiroglu et al. 2024 report a = 0.513 with s.e. 0.020 the same way).
    """
    xs = check_positive(x_name, x)
    ys = check_positive(y_name, y, xs.size)
    if xs.size < 2:
        raise SuiteError(f"a log-linear fit of {y_name} on {x_name} needs at least 2 points, got {xs.size}")
    lx, ly = np.log(xs), np.log(ys)
    if np.ptp(lx) == 0:
        raise SuiteError(f"{x_name} has a single distinct value: the slope is undefined")
    xm = lx.mean()
    sxx = float(np.sum((lx - xm) ** 2))
    s = float(np.sum((lx - xm) * (ly - ly.mean())) / sxx)
    logk = float(ly.mean() - s * xm)
    resid = ly - (logk + s * lx)
    rss = float(resid @ resid)
    dof = xs.size - 2
    params = {"k": float(np.exp(logk)), "s": s}
    stderr, intervals = {"k": float("nan"), "s": float("nan")}, {}
    if dof > 0:
        sigma2 = rss / dof
        se_s = np.sqrt(sigma2 / sxx)
        se_logk = np.sqrt(sigma2 * (1.0 / xs.size + xm ** 2 / sxx))
        t = float(stdtrit(dof, 0.5 + level / 2))
        stderr = {"k": float(params["k"] * se_logk), "s": float(se_s)}
        intervals = {"s": (s - t * se_s, s + t * se_s),
                     "k": (float(np.exp(logk - t * se_logk)), float(np.exp(logk + t * se_logk)))}
    return FitResult(model="loglinear", params=params, objective=rss, n_points=int(xs.size),
                     intervals=intervals, stderr=stderr, level=level,
                     method="OLS in log space", x_name=x_name, y_name=y_name, dof=dof, x_mean=float(xm), sxx=sxx,
                     sigma2=float(rss / dof) if dof > 0 else float("nan"),
                     data_range={x_name: [float(xs.min()), float(xs.max())]})


def fit_lr_law(N, lr_opt, level=0.95) -> FitResult:
    """lr*(N) = c N^-k through per-size optimal learning rates (laws.lr_law): OLS of log lr on log N
    (fit_loglinear), with t-intervals on c and k. The optima are few, already smoothed by a
    parabola each, so OLS with its textbook covariance is the tool (as for allocation exponents).
    dof, sigma2, x_mean and sxx are what `lr_law_band` needs for the confidence band of log lr*(N)."""
    ll = fit_loglinear(N, lr_opt, level=level, x_name="N", y_name="lr_opt")
    lx = np.log(check_positive("N", N))
    ly = np.log(check_positive("lr_opt", lr_opt, lx.size))
    dof = ll.dof
    intervals = {}
    if "s" in ll.intervals:
        intervals = {"c": ll.intervals["k"], "k": (-ll.intervals["s"][1], -ll.intervals["s"][0])}
    return FitResult(model="lr_law", params={"c": ll.params["k"], "k": -ll.params["s"]}, objective=ll.objective,
                     n_points=ll.n_points, intervals=intervals,
                     stderr={"c": ll.stderr["k"], "k": ll.stderr["s"]}, level=level,
                     method="OLS of log lr on log N", dof=dof, x_mean=float(lx.mean()),
                     sxx=float(np.sum((lx - lx.mean()) ** 2)),
                     sigma2=float(ll.objective / dof) if dof > 0 else float("nan"),
                     data_range={"N": [float(np.exp(lx.min())), float(np.exp(lx.max()))],
                                 "lr_opt": [float(np.exp(ly.min())), float(np.exp(ly.max()))]})


def lr_law_band(fit: FitResult, N):
    """(lo, hi) confidence band of lr*(N) at fit.level (OLS mean response in log space), or None.
    Any fit_loglinear result works the same way (its x for N)."""
    if not ((fit.dof or 0) > 0 and fit.sigma2 is not None and np.isfinite(fit.sigma2)):
        return None
    lx = np.log(np.asarray(N, dtype=float))
    se = np.sqrt(fit.sigma2 * (1.0 / fit.n_points + (lx - fit.x_mean) ** 2 / fit.sxx))
    t = float(stdtrit(fit.dof, 0.5 + fit.level / 2))
    mid = np.log(fit.predict(np.asarray(N, dtype=float)))
    return np.exp(mid - t * se), np.exp(mid + t * se)
