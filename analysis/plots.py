"""One function per figure; each returns a matplotlib Figure and saves a PNG when given a path.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas, never through
pyplot: no global backend switch, no window, and no figure registry that grows in long sessions.
Reference slopes are the published exponents (laws.py), anchored at the data so only the slope
is compared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import laws
from .allocation import budget_groups
from .fit import lr_law_band
from .result import FitResult
from .extrapolate import _optimal_D_for_N


def _mpl():
    """matplotlib, imported on first use (a deliberately lazy heavy library): ~1 s of start-up that
    the processes which never draw (training workers, most CLI verbs) should not pay."""
    import matplotlib.backends.backend_agg
    import matplotlib.cm
    import matplotlib.colors
    import matplotlib.figure
    import matplotlib.ticker
    return matplotlib


CMAP = "viridis"


def _figure(ncols=1, width=6.4, height=4.4):
    fig = _mpl().figure.Figure(figsize=(width * ncols, height), layout="constrained")
    _mpl().backends.backend_agg.FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _finish(fig, path):
    for ax in fig.axes:
        if ax.get_yscale() == "log" and "loss" in ax.get_ylabel():
            # Losses span well under a decade on a log axis, where matplotlib would label one 10^0
            # tick or none: put linear "nice" values (2, 2.5, 3, ...) on it instead.
            lo, hi = ax.get_ylim()
            ticks = [t for t in _mpl().ticker.MaxNLocator(7).tick_values(lo, hi) if lo <= t <= hi and t > 0]
            ax.yaxis.set_major_locator(_mpl().ticker.FixedLocator(ticks))
            ax.yaxis.set_major_formatter(_mpl().ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(_mpl().ticker.NullFormatter())
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def _loglog(ax, xlabel, ylabel="loss (nats/token)"):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.25)


def _reference_slope(ax, x, y, slope, label, style="--"):
    """A pure power law y ∝ x^slope through the geometric centre of the points."""
    x = np.asarray(x, dtype=float)
    x0, y0 = np.exp(np.mean(np.log(x))), np.exp(np.mean(np.log(np.asarray(y, dtype=float))))
    xs = np.logspace(np.log10(x.min()), np.log10(x.max()), 50)
    ax.plot(xs, y0 * (xs / x0) ** slope, style, color="0.45", lw=1, label=label)


def _scatter_by(ax, df, x, y, color_col):
    if color_col in df and df[color_col].notna().any() and (df[color_col] > 0).all():
        sc = ax.scatter(df[x], df[y], c=df[color_col], cmap=CMAP, norm=_mpl().colors.LogNorm(), s=18, zorder=3)
        ax.figure.colorbar(sc, ax=ax, label=color_col)
    else:
        ax.scatter(df[x], df[y], s=18, zorder=3, color="C0")


def loss_vs_N(runs_df, fit=None, target_N=None, loss_col="loss", path=None):
    """Final loss against N (coloured by D) with the fitted law, its bootstrap band out to target_N,
    and Kaplan et al. 2020's alpha_N = 0.076 slope (eq. 1.1) for comparison."""
    fig, (ax,) = _figure()
    _scatter_by(ax, runs_df, "N", loss_col, "D")
    N = runs_df["N"].to_numpy(float)
    hi = max(N.max(), target_N or 0)
    grid = np.logspace(np.log10(N.min()), np.log10(hi), 100)
    if fit is not None:
        if fit.model == "chinchilla":
            D = _optimal_D_for_N(grid, fit.params)
            ax.plot(grid, fit.predict(grid, D), color="C3", label="Chinchilla fit at compute-optimal D")
        else:
            ax.plot(grid, fit.predict(grid), color="C3", label=f"fit: E + A N^-α, α = {fit.params['alpha']:.3f}")
            band = fit.predict_interval(grid)
            if band is not None:
                ax.fill_between(grid, band[0], band[1], color="C3", alpha=0.2, label=f"{fit.level:.0%} band")
    if target_N:
        ax.axvline(target_N, color="C1", ls=":", label=f"target N = {target_N:.3g}")
    _reference_slope(ax, N, runs_df[loss_col], -laws.KAPLAN_ALPHA_N, "Kaplan slope α_N = 0.076")
    _loglog(ax, "N (parameters)")
    ax.set_title("loss vs model size")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def loss_vs_D(runs_df, fit=None, loss_col="loss", path=None):
    """Final loss against D (coloured by N) with the fitted L(D) and Kaplan's alpha_D = 0.095."""
    fig, (ax,) = _figure()
    _scatter_by(ax, runs_df, "D", loss_col, "N")
    D = runs_df["D"].to_numpy(float)
    if fit is not None and fit.model == "power_law":
        grid = np.logspace(np.log10(D.min()), np.log10(D.max()), 100)
        ax.plot(grid, fit.predict(grid), color="C3", label=f"fit: E + B D^-β, β = {fit.params['alpha']:.3f}")
        band = fit.predict_interval(grid)
        if band is not None:
            ax.fill_between(grid, band[0], band[1], color="C3", alpha=0.2)
    _reference_slope(ax, D, runs_df[loss_col], -laws.KAPLAN_ALPHA_D, "Kaplan slope α_D = 0.095")
    _loglog(ax, "D (tokens)")
    ax.set_title("loss vs data")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def loss_vs_C(runs_df=None, curves_df=None, envelope=None, fit=None, loss_col="loss", path=None):
    """Loss against FLOPs: every run's curve (coloured by N), final losses, the lower envelope
    (Hoffmann et al. 2022 §3.1, Fig. 2 left), an L(C) fit and Kaplan's alpha_C = 0.050 (eq. 1.3)."""
    fig, (ax,) = _figure()
    ys = []
    if curves_df is not None and len(curves_df) and "N" in curves_df:
        norm = _mpl().colors.LogNorm(curves_df["N"].min(), curves_df["N"].max())
        cmap = fig.colorbar(_mappable(norm), ax=ax, label="N (parameters)").mappable.cmap
        col = "val_loss" if "val_loss" in curves_df else "train_loss"
        for _, g in curves_df.sort_values("flops").groupby("run_id"):
            g = g[(g["flops"] > 0) & np.isfinite(g[col])]
            ax.plot(g["flops"], g[col], color=cmap(norm(g["N"].iloc[0])), lw=0.8, alpha=0.7)
            ys.append(g[col].to_numpy())
    if runs_df is not None and len(runs_df) and "C" in runs_df:
        ax.scatter(runs_df["C"], runs_df[loss_col], s=14, color="k", zorder=3, label="final loss")
        ys.append(runs_df[loss_col].to_numpy(float))
    if envelope is not None and len(envelope.table):
        t = envelope.table
        ax.plot(t["C"], t["loss_opt"], color="C3", lw=2.5, label=f"envelope ({envelope.approach})")
        ys.append(t["loss_opt"].to_numpy())
    if fit is not None and fit.model == "power_law":
        lo, hi = fit.data_range[fit.x_name or "x"]
        grid = np.logspace(np.log10(lo), np.log10(hi), 100)
        ax.plot(grid, fit.predict(grid), color="C1", label=f"L(C) fit, α_C = {fit.params['alpha']:.3f}")
        _reference_slope(ax, grid, fit.predict(grid), -laws.KAPLAN_ALPHA_C, "Kaplan slope α_C = 0.050")
    _loglog(ax, "C (FLOPs)")
    ax.set_title("loss vs compute")
    if ys:
        ax.legend(fontsize=8)
    return _finish(fig, path)


def _mappable(norm):
    return _mpl().cm.ScalarMappable(norm=norm, cmap=CMAP)


def isoflop_curves(runs_df, allocation, loss_col=None, path=None):
    """Hoffmann et al. 2022 Fig. 3 left: loss vs N at each budget, the parabola through the runs
    near the best one (filled markers: the runs it used; hollow: the rest) and its minimum N*, with
    its interval only where that is finite and inside the plotted sizes."""
    loss_col = loss_col or allocation.extras.get("loss_col", "loss")
    fig, (ax,) = _figure()
    df = runs_df.assign(_C=budget_groups(runs_df))
    key = df["run_id"] if "run_id" in df else df.index.to_series()
    used = {u for us in allocation.table.get("used", []) for u in us}
    in_fit = key.isin(used).to_numpy()
    norm = _mpl().colors.LogNorm(df["_C"].min(), df["_C"].max())
    cmap = fig.colorbar(_mappable(norm), ax=ax, label="C (FLOPs)").mappable.cmap
    for C, g in df.groupby("_C"):
        m = in_fit[df.index.get_indexer(g.index)]
        ax.scatter(g["N"][m], g[loss_col][m], color=cmap(norm(C)), s=20, zorder=3)
        ax.scatter(g["N"][~m], g[loss_col][~m], facecolors="none", edgecolors=cmap(norm(C)), s=20, zorder=3)
    n_lo, n_hi = df["N"].min(), df["N"].max()
    for _, r in allocation.table.iterrows():
        color = cmap(norm(r["C"]))
        if "coef" in r and isinstance(r["coef"], (list, tuple)):
            c0, c1, c2 = r["coef"]
            u = np.linspace(r["x_range"][0], r["x_range"][1], 100) - r["x_center"]
            ax.plot(10 ** (u + r["x_center"]), c0 + c1 * u + c2 * u ** 2, color=color, lw=1)
        err = None
        lo, hi = r.get("N_lo", np.nan), r.get("N_hi", np.nan)
        if np.isfinite(lo) and np.isfinite(hi) and n_lo <= lo and hi <= n_hi:
            err = [[r["N_opt"] - lo], [hi - r["N_opt"]]]
        ax.errorbar([r["N_opt"]], [r["loss_opt"]], xerr=err, fmt="*", color=color, ms=10, mec="k", zorder=4)
    if in_fit.any():
        # Keep the fitted region readable: an undertrained giant can sit 100x above the minimum.
        lo_y, hi_y = df[loss_col].min(), df.loc[in_fit, loss_col].max()
        top = hi_y + 2 * (hi_y - lo_y)
        if df[loss_col].max() > top:
            ax.set_ylim(lo_y - 0.05 * (top - lo_y), top)
    ax.set_xscale("log")
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel(f"{loss_col} (nats/token)")
    ax.grid(True, which="both", alpha=0.25)
    ax.set_title(f"IsoFLOP profiles (star: N*, parabola through {allocation.extras.get('window', 'a window')})",
                 fontsize=8)
    return _finish(fig, path)


def optimal_allocation(allocations, path=None):
    """N_opt(C) and D_opt(C) from each approach, with Kaplan's N_opt ∝ C^0.73 (§6.1) and
    Chinchilla's ∝ C^0.5 (Hoffmann et al. 2022 Table 2) as reference slopes."""
    fig, (axN, axD) = _figure(ncols=2, width=5.6)
    allocations = [a for a in allocations if a is not None]
    for i, al in enumerate(allocations):
        t = al.table
        c = f"C{i}"
        for ax, col, exp_name in ((axN, "N_opt", "a"), (axD, "D_opt", "b")):
            lo, hi = col[0] + "_lo", col[0] + "_hi"
            yerr = None
            if lo in t and hi in t:
                # Bars only where the interval is bounded (a bootstrap end can be 0 or inf).
                bounded = np.isfinite(t[lo]) & np.isfinite(t[hi]) & (t[lo] > 0)
                if bounded.any():
                    yerr = [np.where(bounded, t[col] - t[lo], 0.0), np.where(bounded, t[hi] - t[col], 0.0)]
            if not al.identified:     # a staircase of < 3 sizes: its points, no fitted slope
                ax.plot(t["C"], t[col], "o", ms=3, color=c, alpha=0.8, label=f"{al.approach}: not identified")
                continue
            ax.errorbar(t["C"], t[col], yerr=yerr, fmt="o", ms=3, color=c, alpha=0.8)
            grid = np.logspace(np.log10(t["C"].min()), np.log10(t["C"].max()), 50)
            fitted = al.N_opt(grid) if col == "N_opt" else al.D_opt(grid)
            name = al.approach + (f" ({al.extras['form']} form)" if "form" in al.extras else "")
            ax.plot(grid, fitted, color=c, label=f"{name}: {exp_name} = {getattr(al, exp_name):.3f}")
    if allocations:
        t = allocations[0].table
        _reference_slope(axN, t["C"], t["N_opt"], laws.KAPLAN_N_OPT_EXPONENT, "Kaplan C^0.73", ":")
        _reference_slope(axN, t["C"], t["N_opt"], laws.CHINCHILLA_N_OPT_EXPONENT, "Chinchilla C^0.5")
        _reference_slope(axD, t["C"], t["D_opt"], 1 - laws.KAPLAN_N_OPT_EXPONENT, "Kaplan C^0.27", ":")
        _reference_slope(axD, t["C"], t["D_opt"], 1 - laws.CHINCHILLA_N_OPT_EXPONENT, "Chinchilla C^0.5")
    _loglog(axN, "C (FLOPs)", "N_opt (parameters)")
    _loglog(axD, "C (FLOPs)", "D_opt (tokens)")
    axN.legend(fontsize=7)
    axD.legend(fontsize=7)
    axN.set_title("compute-optimal model size")
    axD.set_title("compute-optimal tokens")
    return _finish(fig, path)


def learning_curves(curves_df, runs_df=None, loss_col="val_loss", path=None):
    """Loss against tokens seen, one line per run, coloured by N (log scale)."""
    df = curves_df
    if "N" not in df and runs_df is not None and "N" in runs_df:
        df = df.merge(runs_df[["run_id", "N"]], on="run_id", how="left")
    fig, (ax,) = _figure()
    has_N = "N" in df and df["N"].notna().any()
    if has_N:
        norm = _mpl().colors.LogNorm(df["N"].min(), df["N"].max())
        cmap = fig.colorbar(_mappable(norm), ax=ax, label="N (parameters)").mappable.cmap
    for i, (_, g) in enumerate(df.sort_values("tokens").groupby("run_id")):
        g = g[np.isfinite(g[loss_col]) & (g["tokens"] > 0)]
        color = cmap(norm(g["N"].iloc[0])) if has_N and len(g) and np.isfinite(g["N"].iloc[0]) else f"C{i % 10}"
        ax.plot(g["tokens"], g[loss_col], color=color, lw=1)
    _loglog(ax, "tokens seen", f"{loss_col} (nats/token)")
    ax.set_title("learning curves")
    return _finish(fig, path)


def search_trials(rows, fit, title, path=None):
    """One budget of the Optuna allocation search (scaling_suite/optimize.py): the trials' final
    losses against N, coloured by trial number, the parabola of analysis.minimum.profile_minimum,
    N_opt and its interval where bounded."""
    fig, (ax,) = _figure(width=6.4, height=4.2)
    sc = ax.scatter([r["N"] for r in rows], [r["final_val_loss"] for r in rows], c=[r["trial"] for r in rows],
                    cmap=CMAP, zorder=3)
    fig.colorbar(sc, ax=ax, label="trial")
    if "coef" in fit:
        a, b, c = fit["coef"]
        lo, hi = fit["x_range"]
        xs = np.linspace(lo - 0.1, hi + 0.1, 100)
        ax.plot(10 ** xs, a + b * (xs - fit["x_center"]) + c * (xs - fit["x_center"]) ** 2, "k-", lw=1,
                label="parabola in log N")
    if np.isfinite(fit["x_opt"]):
        ax.axvline(fit["x_opt"], color="C3", lw=1, label=f"N_opt = {fit['x_opt']:,.0f} ({fit['status']})")
        if 0 < fit["x_lo"] and fit["x_hi"] < np.inf:    # a bootstrap interval, where it is bounded
            ax.axvspan(fit["x_lo"], fit["x_hi"], color="C3", alpha=0.12, label=f"{100 * fit['level']:g}% interval")
    ax.set_xscale("log")
    ax.set_xlabel("N (parameters, non-embedding + head)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def lr_law(sizes, law=None, tokens_per_param=None, parametrization="standard", path=None):
    """The learning-rate tuning of scaling_suite/tune.py. Left: final loss vs peak lr per size
    (pruned trials as crosses at their last loss), the parabola in log lr and the optimum. Right:
    lr_opt vs N with intervals, the law lr* = c N^-k and its confidence band (fit.lr_law_band).

    SIZES: per size, {depth, N, trials: [{state, lr, final_val_loss | last_val_loss}], optimum};
    LAW: the fitted law as tune.py records it (params, intervals, objective, n_points, level, extras)."""
    fig, (ax, bx) = _figure(ncols=2, width=5.5, height=4.2)
    for i, s in enumerate(sizes):
        col = f"C{i}"
        done = [r for r in s["trials"] if r["state"] == "COMPLETE"]
        pr = [r for r in s["trials"] if r["state"] == "PRUNED"]
        ax.scatter([r["lr"] for r in done], [r["final_val_loss"] for r in done], color=col, zorder=3,
                   label=f"depth {s['depth']}, N={s['N']:,}")
        ax.scatter([r["lr"] for r in pr], [r["last_val_loss"] for r in pr], color=col, marker="x", alpha=0.6)
        o = s["optimum"]
        if "coef" in o:
            a, b, c = o["coef"]
            xs = np.linspace(o["x_range"][0] - 0.1, o["x_range"][1] + 0.1, 80)
            ax.plot(10 ** xs, a + b * (xs - o["x_center"]) + c * (xs - o["x_center"]) ** 2, color=col, lw=1)
        if "lr_opt" in o:
            ax.axvline(o["lr_opt"], color=col, lw=0.8, ls=":")
            lo, hi = o["lr_lo"], o["lr_hi"]
            err = [[o["lr_opt"] - lo], [hi - o["lr_opt"]]] if np.isfinite(lo) else None
            bx.errorbar([s["N"]], [o["lr_opt"]], yerr=err, fmt="o", color=col, capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats/token); x: pruned (last)")
    ax.legend(fontsize=7)
    ax.set_title("loss vs learning rate per size", fontsize=10)
    if law is not None:
        fit = FitResult.from_dict(law)
        Ns = np.logspace(np.log10(min(s["N"] for s in sizes)) - 0.2, np.log10(max(s["N"] for s in sizes)) + 0.3, 60)
        p = law["params"]
        iv = law["intervals"].get("k")
        lab = f"lr* = {p['c']:.3g} N^-{p['k']:.3f}" + (f", k in [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")
        bx.plot(Ns, fit.predict(Ns), "k-", lw=1, label=lab)
        band = lr_law_band(fit, Ns)
        if band is not None:
            bx.fill_between(Ns, band[0], band[1], color="k", alpha=0.1, label=f"{100 * fit.level:g}% band")
        bx.legend(fontsize=8)
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("N (parameters, non-embedding + head)")
    bx.set_ylabel("optimal peak learning rate")
    bx.set_title(f"lr law at D/N = {tokens_per_param:g} ({parametrization})", fontsize=10)
    return _finish(fig, path)


def residuals(fit, *inputs, loss, path=None):
    """Log-space residuals log L_hat - log L of a fit: against the first input (trend = wrong form)
    and as a histogram (heavy tails = what the Huber loss is there for)."""
    fig, (ax, axh) = _figure(ncols=2, width=5.2)
    x = np.asarray(inputs[0], dtype=float)
    loss = np.asarray(loss, dtype=float)
    r = np.log(fit.predict(*inputs)) - np.log(loss)
    ax.scatter(x, 100 * r, s=12)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    name = {"chinchilla": "N", "kaplan": "N"}.get(fit.model, fit.x_name or "x")
    ax.set_xlabel(name)
    ax.set_ylabel("residual log L_hat - log L (%)")
    ax.set_title(f"{fit.model} residuals ({fit.n_points} points)")
    axh.hist(100 * r, bins=min(40, max(5, r.size // 4)), color="C0")
    axh.set_xlabel("residual (%)")
    axh.set_ylabel("count")
    return _finish(fig, path)

