"""Compute-optimal allocation: Hoffmann et al. 2022's three approaches to N_opt(C), D_opt(C).

1. `envelope`: the lower envelope of all training curves in (FLOPs, loss); the run on the envelope
   at each FLOP value gives N_opt(C) (§3.1).
2. `isoflop`: at each fixed budget, a parabola in log N through the final losses of the runs near
   the best one (minimum.py); its minimum is N*(C) (§3.2).
3. `from_parametric`: closed form from a fitted L(N, D): E + A/N^alpha + B/D^beta (§3.3 eq. 4), or
   Kaplan et al. 2020's eq. 1.5 (laws.kaplan_optimal); analysis/report.py says which form is used.
Each fits N_opt ∝ C^a and D_opt ∝ C^b (Table 2: a ≈ 0.50, b ≈ 0.50; Kaplan et al. 2020 §6: 0.73).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scaling_suite.errors import SuiteError

from . import laws, minimum
from .common import jsonable, n_distinct, percentile_interval
from .fit import MIN_SUPPORT as MIN_SIZES
from .fit import fit_loglinear
from .result import FitResult

NOTE_KEYS = ("interval_note", "form_note")    # extras a reader needs beside a: why no interval; approach 3's form


@dataclass(frozen=True)
class Allocation:
    """N_opt ∝ C^a, D_opt ∝ C^b from one approach, with the per-C table it came from."""
    approach: str
    a: float
    b: float
    a_interval: tuple = (float("nan"), float("nan"))
    b_interval: tuple = (float("nan"), float("nan"))
    table: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False, compare=False)
    N_fit: FitResult | None = None
    D_fit: FitResult | None = None
    level: float = 0.95
    skipped: dict = field(default_factory=dict)      # budget -> reason it was left out
    extras: dict = field(default_factory=dict)

    @property
    def identified(self) -> bool:
        """False when the data do not pin the exponents down (envelope over < 3 distinct sizes)."""
        return not self.extras.get("unidentified")

    def N_opt(self, C):
        return self._closed_form(C)[0] if self.approach == "parametric" else self.N_fit.predict(C)

    def D_opt(self, C):
        return self._closed_form(C)[1] if self.approach == "parametric" else self.D_fit.predict(C)

    def _closed_form(self, C):
        optimal = laws.PARAMETRIC[self.extras.get("form", "chinchilla")][1]
        return optimal(C, **self.extras["params"], flops_per_token_factor=self.extras["flops_per_token_factor"])

    def report(self) -> str:
        pct = f"{100 * self.level:g}%"
        lines = [f"allocation ({self.approach}): N_opt ∝ C^a with a = {self.a:.4f} "
                 f"[{_fmt(self.a_interval[0])}, {_fmt(self.a_interval[1])}] ({pct}); "
                 f"D_opt ∝ C^b with b = {self.b:.4f} [{_fmt(self.b_interval[0])}, {_fmt(self.b_interval[1])}]"]
        if len(self.table):
            cols = [c for c in ("C", "N_opt", "N_lo", "N_hi", "D_opt", "tokens_per_param", "loss_opt", "n_used", "n_runs")
                    if c in self.table]
            t = self.table
            if len(t) > 12:   # envelope tables have one row per FLOP bucket: show a spread of rows
                t = t.iloc[np.unique(np.linspace(0, len(t) - 1, 12).round().astype(int))]
            lines.append(t[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if "n_sizes_visited" in self.extras:
            lines.append(f"the envelope visits {self.extras['n_sizes_visited']} distinct size(s); intervals: "
                         f"{self.extras.get('interval_method', 'none')}")
        if self.approach == "isoflop":
            lines.append(f"intervals on a and b: {self.extras.get('interval_method', 'none')}")
            boot = self.extras.get("bootstrap_interval")
            if boot:
                lines.append("  beside it, a bootstrap over runs within budgets: " + (
                    f"a in [{_fmt(boot['a'][0])}, {_fmt(boot['a'][1])}] ({boot['resamples_used']} of "
                    f"{boot['n_bootstrap']} resamples locate >= 2 minima)" if "a" in boot else f"undefined: {boot['note']}"))
        lines += [self.extras[k] for k in NOTE_KEYS if k in self.extras]
        lines += [f"WARNING: {msg}" for msg in self.extras.get("unidentified", {}).values()]
        items = list(self.skipped.items())
        for k, why in items[:6]:
            lines.append(f"  skipped {k}: {why}")
        if len(items) > 6:
            lines.append(f"  ... and {len(items) - 6} more skipped (all listed in to_dict()['skipped'])")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return jsonable({
            "approach": self.approach, "a": self.a, "a_interval": self.a_interval, "b": self.b,
            "b_interval": self.b_interval, "level": self.level,
            "table": self.table.to_dict(orient="records"), "skipped": self.skipped,
            "N_fit": self.N_fit.to_dict() if self.N_fit else None,
            "D_fit": self.D_fit.to_dict() if self.D_fit else None,
            "extras": {k: v for k, v in self.extras.items()}})


def _fmt(v):
    return "nan" if not np.isfinite(v) else f"{v:.4f}"


def _exponents(C, N_opt, D_opt, level, approach, table, skipped, extras) -> Allocation:
    N_fit = fit_loglinear(C, N_opt, level=level, x_name="C", y_name="N_opt")
    D_fit = fit_loglinear(C, D_opt, level=level, x_name="C", y_name="D_opt")
    nan2 = (float("nan"), float("nan"))
    return Allocation(approach=approach, a=N_fit.params["s"], b=D_fit.params["s"],
                      a_interval=N_fit.intervals.get("s", nan2), b_interval=D_fit.intervals.get("s", nan2),
                      table=table, N_fit=N_fit, D_fit=D_fit, level=level, skipped=skipped, extras=extras)


def _need_columns(df, cols, what):
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SuiteError(f"{what} needs column(s) {', '.join(missing)}; got {', '.join(map(str, df.columns))}")


# --- Approach 1 ----------------------------------------------------------------------------------

# Hoffmann et al. 2022 App. B (Fig. A1): a cosine cycle over ~25% longer than the steps taken leaves
# a model clearly worse than one whose cycle ends there; their approach 1 has a run near its cycle's end
# at every C (4 horizons per size). Studies here train one horizon per (size, budget), so a curve is read
# only where its D is <= 1.25x the tokens seen. On a noise-free planted law in an IsoFLOP design whole
# curves give a = 0.406 for the true 0.469, this rule 0.467 (tests; docs/isoflop-and-prediction.md).
MIN_PROGRESS = 0.8


def envelope(curves_df: pd.DataFrame, runs_df: pd.DataFrame | None = None, n_buckets: int = 100,
             loss_col: str = "val_loss", level: float = 0.95, n_bootstrap: int = 1000, seed: int = 0,
             min_progress: float = MIN_PROGRESS) -> Allocation:
    """Hoffmann et al. 2022 §3.1: at each of n_buckets log-spaced FLOP values (they used 1,500),
    interpolate every run's loss (linear in log FLOPs) and take the run with the lowest loss; its N
    (and the tokens it had seen there) is N_opt (D_opt) at that C. Only FLOP values reached by at
    least two runs count. N per run comes from curves_df["N"] or from runs_df (run_id, N).

    A run counts from progress MIN_PROGRESS on (tokens / D, D from runs_df or the last point); 0 reads
    whole curves, right only where every point is a trained model (a planted law, no schedule).

    The buckets are not independent observations: the envelope is a staircase of a few runs, so an
    OLS interval over buckets counts one run many times. Intervals on a and b are percentile
    bootstrap intervals over RUNS (resample the runs, rebuild the envelope on the same buckets,
    refit). The slope is identified only when the envelope visits >= 3 distinct sizes
    (common.n_distinct, the fits' rule in fit.term_support): a staircase of two sizes has a slope
    set by where the one step falls, not by how N_opt grows; it is reported, marked unidentified."""
    runs = _run_curves(curves_df, runs_df, loss_col, min_progress)
    lo = min(r[2][0] for r in runs)
    hi = max(r[2][-1] for r in runs)
    grid = np.linspace(lo, hi, n_buckets)
    # Loss (inf where a run does not reach that C) and tokens of every run at every bucket.
    L = np.full((len(runs), n_buckets), np.inf)
    T = np.full((len(runs), n_buckets), np.nan)
    for i, (_, _, lf, loss, tok) in enumerate(runs):
        cov = (grid >= lf[0]) & (grid <= lf[-1])
        L[i, cov] = np.interp(grid[cov], lf, loss)
        T[i, cov] = np.exp(np.interp(grid[cov], lf, np.log(tok)))
    Ns = np.array([r[1] for r in runs])

    def pick(members):
        """(bucket mask, winning run per bucket) over the runs `members` (unique indices)."""
        sub = L[members]
        ok = np.isfinite(sub).sum(axis=0) >= 2
        return ok, members[np.argmin(sub, axis=0)]

    ok, win = pick(np.arange(len(runs)))
    b = np.flatnonzero(ok)
    table = pd.DataFrame({"C": np.exp(grid[b]), "N_opt": Ns[win[b]], "D_opt": T[win[b], b],
                          "loss_opt": L[win[b], b], "run_id": [runs[i][0] for i in win[b]],
                          "n_runs": np.isfinite(L[:, b]).sum(axis=0)})
    if len(table) < 2 or table["N_opt"].nunique() < 2:
        raise SuiteError("envelope: one run is lowest at every FLOP value reached by two or more runs "
                         f"(each run read from {min_progress:.0%} of its schedule on); need runs of several "
                         "sizes ending at the same FLOP values (IsoFLOP budgets), or horizons per size")
    table["tokens_per_param"] = table["D_opt"] / table["N_opt"]
    visited = n_distinct(np.log(table["N_opt"].to_numpy(float)))
    sizes = sorted(set(table["N_opt"]))
    extras = {"n_runs": len(runs), "n_buckets": int(len(table)), "loss_col": loss_col, "min_progress": min_progress,
              "n_sizes_visited": visited, "sizes_visited": sizes}
    al = _exponents(table["C"], table["N_opt"], table["D_opt"], level, "envelope", table, {}, extras)
    a_iv = b_iv = (float("nan"), float("nan"))
    if n_bootstrap:
        a_d, b_d = _envelope_slope_draws(pick, len(runs), Ns, T, grid, n_bootstrap, seed)
        undefined = float(np.mean(np.isnan(a_d)))
        extras.update(interval_method=f"percentile bootstrap over runs ({n_bootstrap} resamples)", boot_undefined=undefined)
        if undefined <= 1 - level:
            a_iv = tuple(float(v) for v in percentile_interval(a_d, level))
            b_iv = tuple(float(v) for v in percentile_interval(b_d, level))
        else:   # as for isoflop: an interval over the lucky resamples only would overstate
            extras["interval_note"] = (f"no {level:.0%} interval: in {undefined:.0%} of the resamples of the runs "
                                       f"fewer than 2 FLOP values are reached by two runs (no slope)")
    else:
        extras["interval_method"] = "none"
    if visited < MIN_SIZES:
        shown = ", ".join(f"{n:.3g}" for n in sizes)
        extras["unidentified"] = {"a": (
            f"a and b not identified: the envelope visits only {visited} distinct size(s) (N = {shown}); a slope "
            f"through a staircase of fewer than {MIN_SIZES} sizes is set by where its step falls, not by how "
            f"N_opt grows (value and interval are not measurements)")}
    return replace(al, a_interval=a_iv, b_interval=b_iv, extras=extras)


def _run_curves(curves_df, runs_df, loss_col: str, min_progress: float) -> list:
    """(run_id, N, log flops, loss, tokens) per run with >= 2 valid curve points at progress >=
    MIN_PROGRESS, in FLOPs order."""
    if curves_df is None or len(curves_df) == 0:
        raise SuiteError("envelope needs learning curves; none were given")
    df = curves_df
    for col in ("N", "D"):
        if col not in df.columns and runs_df is not None and col in runs_df.columns:
            df = df.merge(runs_df[["run_id", col]], on="run_id", how="left")
    if "N" not in df.columns:
        raise SuiteError("envelope needs N per run: a column N in the curves or runs_df with run_id, N")
    _need_columns(df, ["run_id", "flops", loss_col, "N"], "envelope")
    df = df[np.isfinite(df[loss_col]) & (df["flops"] > 0) & (df[loss_col] > 0) & (df["N"] > 0)]
    runs = []
    for run_id, g in df.sort_values("flops").groupby("run_id", sort=False):
        tok = g["tokens"].to_numpy(float) if "tokens" in g else g["flops"].to_numpy(float) / (6 * g["N"].to_numpy(float))
        D = float(g["D"].iloc[0]) if "D" in g and np.isfinite(g["D"].iloc[0]) else float(tok.max())
        keep = tok >= min_progress * D * (1 - 1e-9)
        if keep.sum() >= 2:
            runs.append((run_id, float(g["N"].iloc[0]), np.log(g["flops"].to_numpy(float)[keep]),
                         g[loss_col].to_numpy(float)[keep], tok[keep]))
    if len(runs) < 2:
        raise SuiteError(f"envelope needs curves (>= 2 points each) from at least 2 runs, got {len(runs)}")
    return runs


def _envelope_slope_draws(pick, n_runs: int, Ns, T, grid, n_bootstrap: int, seed: int):
    """The slopes a (of log N_opt) and b (of log D_opt) on log C of the envelopes of N_BOOTSTRAP
    resamples of the runs (PICK: the envelope of a set of runs); NaN where a resample has no slope."""
    rng = np.random.default_rng(seed)
    lC = grid
    a_d, b_d = [], []
    for _ in range(n_bootstrap):
        # A run drawn twice leaves the envelope as it is: a resample is its set of distinct runs.
        ok_b, win_b = pick(np.unique(rng.integers(0, n_runs, n_runs)))
        bb = np.flatnonzero(ok_b)
        lN = np.log(Ns[win_b[bb]])
        # One run lowest everywhere is a draw of slope 0 (N_opt does not move), not a failure.
        if bb.size >= 2:
            a_d.append(np.polyfit(lC[bb], lN, 1)[0])
            b_d.append(np.polyfit(lC[bb], np.log(T[win_b[bb], bb]), 1)[0])
        else:   # fewer than 2 FLOP values reached by two runs: no slope at all
            a_d.append(np.nan)
            b_d.append(np.nan)
    return a_d, b_d


# --- Approach 2 ----------------------------------------------------------------------------------

def budget_groups(runs_df: pd.DataFrame, gap_decades: float = 0.02) -> pd.Series:
    """The compute budget each run belongs to: C_budget where given; otherwise measured C values
    are clustered (sorted in log10, a new budget starts after a gap > gap_decades, i.e. ~5%) and
    each cluster is named by its median, since runs planned for one budget land within a few %."""
    if "C_budget" in runs_df.columns and runs_df["C_budget"].notna().any():
        key = runs_df["C_budget"].astype(float)
        if "C" in runs_df.columns:
            key = key.fillna(runs_df["C"].astype(float))
        return key
    _need_columns(runs_df, ["C"], "grouping by compute budget")
    lc = np.log10(runs_df["C"].astype(float).to_numpy())
    order = np.argsort(lc)
    cluster = np.empty(lc.size, dtype=int)
    cluster[order] = np.concatenate([[0], np.cumsum(np.diff(lc[order]) > gap_decades)])
    med = pd.Series(lc).groupby(cluster).transform("median").to_numpy()
    return pd.Series(10 ** med, index=runs_df.index)


def isoflop(runs_df: pd.DataFrame, loss_col: str | None = None, level: float = 0.95,
            band: float = minimum.BAND, nearest: int | None = None, decades: float | None = None,
            n_bootstrap: int = 1000,
            seed: int = 0) -> Allocation:
    """Hoffmann et al. 2022 §3.2: per budget, the minimum N* of the loss in log N, from a parabola
    through the runs NEAR the budget's best run (minimum.profile_minimum: those within `band` of its
    loss, or the `nearest` sizes, or `decades` around it; the rule and why are in that module;
    band=inf is the all-points parabola, kept for comparison). D* = C / (k N*), k the budget's
    median C / (N D) (6 when D is absent). Budgets with < 3 sizes, whose best run is at an edge
    (unbracketed) or without a convex vertex inside their window are skipped with the reason.
    Then N_opt ∝ C^a and D_opt ∝ C^b by OLS over the budgets.

    Intervals. On N* and D* of a budget: percentile bootstrap over its runs (minimum.profile_minimum).
    On a and b: the OLS t-interval over the budgets' minima (dof = budgets - 2, so none from 2
    budgets; fit_loglinear, the textbook standard error of a line fitted to a few optima): the
    budgets are independent (disjoint runs), and the scatter of their N* about the line carries
    whatever moved them (seed noise, the window, the sizes tried). The bootstrap over runs of the slope (runs
    resampled within each budget, every step repeated) is reported beside it (extras
    `bootstrap_interval`), not as the interval: with the 3-6 runs an adaptive budget holds, a
    resample often keeps < 3 sizes of some budget, that budget drops out of the draw, and the draw's
    slope then rests on 2-3 budgets over a fraction of the span; the percentiles measure that
    resampling artefact (on the second-corpus quick study: [0.06, 0.93] against OLS [0.38, 0.47]),
    or are undefined when most draws lose a minimum.
    The table's `used` column lists the runs (run_id, else row index) each budget's parabola used."""
    loss_col = loss_col or next((c for c in ("final_val_loss", "loss") if c in runs_df.columns), "loss")
    _need_columns(runs_df, ["N", loss_col], "isoflop")
    df = runs_df.assign(_C=budget_groups(runs_df))
    df = df[np.isfinite(df[loss_col].astype(float)) & (df["N"] > 0) & (df[loss_col] > 0)]
    names = df["run_id"] if "run_id" in df.columns else pd.Series(df.index, index=df.index)
    rows, skipped, draws = [], {}, []
    rng = np.random.default_rng(seed)
    for C, g in df.groupby("_C"):
        name = f"C={C:.3g}"
        m, d = minimum.profile_minimum(g["N"].to_numpy(float), g[loss_col].to_numpy(float), band=band,
                                       nearest=nearest, decades=decades, n_bootstrap=n_bootstrap, level=level,
                                       seed=int(rng.integers(2**31)), return_draws=True)
        if m["status"] != "ok":
            skipped[name] = f"{m['status']}: {m['reason']}"
            continue
        k = 6.0
        if "D" in g.columns and g["D"].notna().all() and (g["D"] > 0).all():
            cg = g["C"].to_numpy(float) if "C" in g.columns and g["C"].notna().all() else np.full(len(g), C)
            k = float(np.median(cg / (g["N"].to_numpy(float) * g["D"].to_numpy(float))))
        N_star, lo, hi = m["x_opt"], m["x_lo"], m["x_hi"]
        rows.append({"C": float(C), "n_runs": int(len(g)), "n_sizes": m["n_sizes"], "n_used": m["n_points"],
                     "N_opt": N_star, "N_lo": lo, "N_hi": hi, "D_opt": C / (k * N_star),
                     "D_lo": C / (k * hi) if hi > 0 else float("nan"),     # hi = inf -> 0: unbounded
                     "D_hi": (C / (k * lo) if lo > 0 else float("inf")) if np.isfinite(lo) else float("nan"),
                     "loss_opt": m["loss_opt"], "flops_per_token_factor": k,
                     "coef": m["coef"], "x_center": m["x_center"], "x_range": m["x_range"],
                     "boot_undefined": m["boot_undefined"],
                     "used": [names.loc[g.index[i]] for i in m["used"]]})
        draws.append(d)
    table = pd.DataFrame(rows)
    if len(table) < 2:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no budgets"
        raise SuiteError(f"isoflop needs a bracketed minimum at >= 2 budgets, got {len(table)} ({why})")
    table["tokens_per_param"] = table["D_opt"] / table["N_opt"]
    al = _exponents(table["C"], table["N_opt"], table["D_opt"], level, "isoflop", table, skipped,
                    {"loss_col": loss_col, "window": minimum.window_name(band, nearest, decades),
                     "interval_method": f"OLS t-interval over the {len(table)} budgets' minima "
                                        f"(dof {len(table) - 2})"})
    if len(table) == 2:
        al.extras["interval_note"] = f"2 budgets: no {level:.0%} interval on a and b (an OLS line through 2 points)"
    if n_bootstrap:
        a_iv, b_iv, used = _bootstrap_slopes(table, np.array(draws), level)
        boot = {"n_bootstrap": int(n_bootstrap), "resamples_used": int(used)}
        if used < level * n_bootstrap:
            # Most resamples lose a budget's bracket: percentiles over the few that keep two would be
            # conditional on luck.
            boot["note"] = (f"only {used} of {n_bootstrap} resamples of the runs locate a minimum at >= 2 budgets "
                            f"(too few runs around each minimum)")
        else:
            boot.update(a=list(a_iv), b=list(b_iv))
        al.extras["bootstrap_interval"] = boot
    return al


def _bootstrap_slopes(table, draws, level):
    """Percentile intervals of a and b from per-budget draws of log10 N* (budgets x resamples): each
    resample's slopes by OLS over its budgets with a located minimum (>= 2 of them)."""
    lC = np.log10(table["C"].to_numpy(float))
    lk = np.log10(table["flops_per_token_factor"].to_numpy(float))
    a_d, b_d = [], []
    for col in draws.T:
        f = np.isfinite(col)
        if f.sum() >= 2 and np.ptp(lC[f]) > 0:
            a = np.polyfit(lC[f], col[f], 1)[0]
            b = np.polyfit(lC[f], lC[f] - lk[f] - col[f], 1)[0]     # D* = C / (k N*)
            a_d.append(a)
            b_d.append(b)
    if not a_d:
        nan2 = (float("nan"), float("nan"))
        return nan2, nan2, 0
    return (tuple(float(v) for v in percentile_interval(a_d, level)),
            tuple(float(v) for v in percentile_interval(b_d, level)), len(a_d))


# --- Approach 3 ----------------------------------------------------------------------------------

def from_parametric(fit: FitResult, C=None, level: float | None = None,
                    flops_per_token_factor: float = 6.0) -> Allocation:
    """The closed-form N_opt(C), D_opt(C) and exponents of a parametric L(N, D) fit: Chinchilla's
    (Hoffmann et al. 2022 §3.3 eq. 4: a = beta/(alpha+beta)) or Kaplan's (laws.kaplan_optimal:
    a = alpha_D/(alpha_N+alpha_D)). Intervals are percentiles over the fit's bootstrap draws (each
    draw's own closed form), when it carries them."""
    if fit.model not in laws.PARAMETRIC:
        raise SuiteError(f"from_parametric needs a {' or '.join(laws.PARAMETRIC)} fit, got {fit.model}")
    law, optimal, exponents, (e1, e2) = laws.PARAMETRIC[fit.model]
    level = fit.level if level is None else level
    p = fit.params
    if C is None:
        lo, hi = (fit.data_range or {}).get("C", (1e18, 1e22))
        C = np.logspace(np.log10(lo), np.log10(hi), 9)
    C = np.atleast_1d(np.asarray(C, dtype=float))
    a, b = (float(v) for v in exponents(p[e1], p[e2]))
    N_opt, D_opt = optimal(C, **p, flops_per_token_factor=flops_per_token_factor)
    table = pd.DataFrame({"C": C, "N_opt": N_opt, "D_opt": D_opt, "loss_opt": law(N_opt, D_opt, **p)})
    a_iv = b_iv = (float("nan"), float("nan"))
    if fit.samples:
        s = fit.samples
        sa, sb = exponents(np.asarray(s[e1]), np.asarray(s[e2]))
        a_iv, b_iv = (tuple(float(v) for v in percentile_interval(x, level)) for x in (sa, sb))
        draws = {k: np.asarray(v)[:, None] for k, v in s.items()}
        Nd, Dd = optimal(C[None, :], **draws, flops_per_token_factor=flops_per_token_factor)
        table["N_lo"], table["N_hi"] = percentile_interval(Nd, level)
        table["D_lo"], table["D_hi"] = percentile_interval(Dd, level)
    table["tokens_per_param"] = table["D_opt"] / table["N_opt"]
    return Allocation(approach="parametric", a=a, b=b, a_interval=a_iv, b_interval=b_iv, table=table,
                      level=level, extras={"form": fit.model, "params": dict(p),
                                           "flops_per_token_factor": flops_per_token_factor,
                                           "interval_method": "bootstrap draws" if fit.samples else "none"})
