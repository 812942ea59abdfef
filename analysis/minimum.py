"""The one routine that finds the minimum of a loss profile: N*(C) of an IsoFLOP budget (Hoffmann
et al. 2022 §3.2, approach 2), the optimum of an Optuna search's budget (scaling_suite.optimize) and
the tuned learning rate of one size (scaling_suite.tune). All three call `profile_minimum`.

A parabola in log x is the second-order Taylor expansion of the loss around its minimum, so it
describes the profile only NEAR the minimum. Real IsoFLOP profiles are asymmetric (undertrained
large models climb steeply): a parabola through every run of a budget is pulled towards the steep
side, moves N* and can push it outside the sizes tried. So the parabola is fitted through a window
around the best run only, always holding the nearest size on each side of the best (so the vertex
is bracketed by the points that fit it). The window is one of:

- `band=r` (the default for `analyze`, r = 0.10): the runs whose loss is within r of the best
  (loss <= best * (1 + r)). A Taylor expansion holds where the loss has risen little above its
  minimum, whatever the spacing of the sizes, and the band must be several times the seed-to-seed
  noise of a final loss (~1% here, README "Precision") for the parabola to see curvature rather than
  noise. On planted undertrained profiles at 1% noise (13 budgets over 6 decades, a fixed list of
  21 sizes; 30 seeds) the error of a had median 0.006 for r = 0.10 (0.005 for 0.08-0.15), against
  0.011 for the 5 nearest sizes and 0.18 for all points; the nearest-k rule also changed with the
  grid's spacing (k = 9 was best at 0.25 decades, k = 13 at 0.125), the band did not.
- `nearest=k`: the k distinct sizes nearest the best in log x (issue 14: the 5 nearest gave
  a = 0.687 on a published IsoFLOP set where the paper reports 0.706 and all points 0.780).
- `decades=w` (the Optuna search and lr tuning, whose trials are dense near the optimum): the runs
  within w decades of the best.

Porian et al. 2024 (§2, "Resolving discrepancies...") fit a smooth interpolant in log-log space
instead; a windowed parabola is the simpler local model with the same aim.

A budget is bracketed when its best run has a run on each side (a smaller and a larger size);
otherwise the minimum may lie beyond the sizes tried and no vertex is reported (the best run is).
Intervals are percentile bootstrap intervals over runs: resample the runs with replacement and
repeat the whole procedure (best run, window, parabola). A resample whose best run sits at an edge
(or whose vertex leaves its window) says the minimum may lie beyond it: its draw is -inf/+inf, so
an interval can be unbounded. A resample with < 3 sizes or a concave fit has no vertex: it is left
out, and the share left out is reported (`boot_undefined`); when that share exceeds 1 - level there
is no interval (NaN, with `interval_note`), since the rest would be the lucky resamples only.
"""

from __future__ import annotations

import numpy as np

from .common import distinct_groups

BAND = 0.10


def _locate(lx, y, band, nearest, decades, rel):
    """(status, reason, detail) of one profile: detail holds the window and the parabola.
    lx: log10 x; y: loss (finite)."""
    groups = distinct_groups(lx * np.log(10), rel)
    n_sizes = int(groups.max() + 1) if groups.size else 0
    if n_sizes < 3:
        return "too_few", f"{n_sizes} distinct size(s); a parabola needs 3", {"n_sizes": n_sizes}
    centers = np.array([lx[groups == g].mean() for g in range(n_sizes)])
    ib = int(np.argmin(y))
    gb = int(groups[ib])
    det = {"n_sizes": n_sizes, "best": ib}
    if gb == 0 or gb == n_sizes - 1:
        side = "smallest" if gb == 0 else "largest"
        return "unbracketed", (f"the best run is at the {side} size tried (x = {10 ** centers[gb]:.4g}): the "
                               f"minimum may lie beyond it"), {**det, "edge": -1 if gb == 0 else 1}
    dist = np.abs(centers - centers[gb])
    must = {gb - 1, gb, gb + 1}                         # the best and its neighbour on each side
    if decades is not None:
        sel = np.isin(groups, sorted(set(np.flatnonzero(dist <= decades).tolist()) | must))
    elif nearest is not None:
        rest = [g for g in np.argsort(dist, kind="stable") if g not in must]
        sel = np.isin(groups, sorted(must | set(int(g) for g in rest[:max(0, nearest - 3)])))
    else:
        sel = np.isin(groups, sorted(must)) | (y <= y[ib] * (1 + band))
    xs, ys = lx[sel] - centers[gb], y[sel]
    X = np.column_stack([np.ones_like(xs), xs, xs ** 2])
    coef, *_ = np.linalg.lstsq(X, ys, rcond=None)
    c0, c1, c2 = (float(v) for v in coef)
    det.update(sel=sel, coef=[c0, c1, c2], x_center=float(centers[gb]),
               x_range=[float(xs.min() + centers[gb]), float(xs.max() + centers[gb])])
    if c2 <= 0:
        return "no_minimum", "the loss is not convex in log x over the window (no minimum)", det
    v = -c1 / (2 * c2)
    det.update(x_opt=float(centers[gb] + v), loss_opt=float(c0 - c1 ** 2 / (4 * c2)))
    if not xs.min() <= v <= xs.max():
        return "extrapolated", (f"the parabola's vertex (x = {10 ** (centers[gb] + v):.4g}) lies outside the "
                                f"runs it was fitted to"), {**det, "edge": -1 if v < xs.min() else 1}
    return "ok", "", det


def _draw(lx, y, band, nearest, decades, rel):
    """(log10 x*, loss*) of one resample: +-inf where its minimum may lie beyond its sizes, NaN
    where it has none (too few sizes, concave)."""
    status, _, det = _locate(lx, y, band, nearest, decades, rel)
    if status == "ok":
        return det["x_opt"], det["loss_opt"]
    if status in ("unbracketed", "extrapolated"):
        return det["edge"] * np.inf, float(y.min())
    return np.nan, np.nan


def _quantiles(draws, level):
    """Central `level` interval of draws that may hold +-inf (NaN left out). inverted_cdf returns
    sample values, so an infinite end is never interpolated into NaN."""
    d = np.asarray(draws, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return float("nan"), float("nan")
    q = (1 - level) / 2
    return (float(np.quantile(d, q, method="inverted_cdf")), float(np.quantile(d, 1 - q, method="inverted_cdf")))


def window_name(band: float = BAND, nearest: int | None = None, decades: float | None = None) -> str:
    """The window rule in words (decades, else nearest, else band: the precedence _locate uses)."""
    if decades is not None:
        return f"the runs within {decades:g} decades of the best run"
    if nearest is not None:
        return f"the {nearest} sizes nearest the best run"
    if not np.isfinite(band):
        return "all runs (a parabola through every run: biased on asymmetric profiles)"
    return f"the runs within {band:.0%} of the best run's loss"


def profile_minimum(x, loss, band: float = BAND, nearest: int | None = None, decades: float | None = None,
                    n_bootstrap: int = 1000,
                    seed: int = 0, level: float = 0.95, rel: float = 0.01, return_draws: bool = False):
    """Minimum of loss(x) from a parabola in log10 x through a window around the best run (the
    window: `decades` if given, else `nearest` if given, else `band`; see the module docstring).

    Returns a dict: status ("ok", or why there is no vertex: "too_few", "unbracketed",
    "no_minimum", "extrapolated"), reason, bracketed, x_opt / loss_opt (the vertex; the best run
    when status is not ok), x_lo / x_hi and loss_lo / loss_hi (percentile bootstrap over runs; NaN
    without one, +-inf where unbounded), best_x, best_loss, used (indices of the input points in the
    parabola), coef (c0, c1, c2 of c0 + c1 u + c2 u^2, u = log10 x - x_center), x_center, x_range,
    n_points, n_sizes, window, level, n_bootstrap, boot_undefined. With return_draws, (dict, draws
    of log10 x*) so a caller can bootstrap what it derives from several profiles.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(loss, dtype=float).ravel()
    ok = np.isfinite(x) & (x > 0) & np.isfinite(y)
    idx = np.flatnonzero(ok)
    lx, y = np.log10(x[ok]), y[ok]
    window = window_name(band, nearest, decades) + ", with the nearest size on each side of it"
    out = {"status": "too_few", "reason": "no finite points", "bracketed": False, "n_points": 0,
           "n_sizes": 0, "window": window, "level": level, "n_bootstrap": 0, "boot_undefined": float("nan"),
           "x_opt": float("nan"), "x_lo": float("nan"), "x_hi": float("nan"), "loss_opt": float("nan"),
           "loss_lo": float("nan"), "loss_hi": float("nan"), "used": []}
    draws = np.full(0, np.nan)
    if y.size == 0:
        return (out, draws) if return_draws else out
    status, reason, det = _locate(lx, y, band, nearest, decades, rel)
    ib = int(np.argmin(y))
    out.update(status=status, reason=reason, bracketed=status not in ("too_few", "unbracketed"),
               n_sizes=det["n_sizes"], best_x=float(10 ** lx[ib]), best_loss=float(y[ib]),
               x_opt=float(10 ** lx[ib]), loss_opt=float(y[ib]))
    if "sel" in det:
        out.update(used=[int(i) for i in idx[det["sel"]]], n_points=int(det["sel"].sum()), coef=det["coef"],
                   x_center=det["x_center"], x_range=det["x_range"])
    if status != "ok":
        return (out, draws) if return_draws else out
    out.update(x_opt=float(10 ** det["x_opt"]), loss_opt=det["loss_opt"])
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        n = y.size
        bx, bl = np.empty(n_bootstrap), np.empty(n_bootstrap)
        for b in range(n_bootstrap):
            r = rng.integers(0, n, n)
            bx[b], bl[b] = _draw(lx[r], y[r], band, nearest, decades, rel)
        undefined = float(np.isnan(bx).mean())
        out.update(n_bootstrap=int(n_bootstrap), boot_undefined=undefined)
        if undefined <= 1 - level:
            lo, hi = _quantiles(bx, level)
            llo, lhi = _quantiles(bl, level)
            out.update(x_lo=float(10 ** lo), x_hi=float(10 ** hi), loss_lo=llo, loss_hi=lhi)
        else:   # the resamples that still have a vertex are the lucky ones: no interval from them
            out["interval_note"] = (f"no {level:.0%} interval: {undefined:.0%} of the resamples have < 3 sizes "
                                    f"or no convex minimum")
        draws = bx
    return (out, draws) if return_draws else out
