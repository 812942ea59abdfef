"""IsoFLOP minima: windowed parabola vs all points, on planted profiles and on a real study.

    python benchmarks/isoflop_windows.py                         # planted, 30 seeds (~1 minute)
    MLFLOW_TRACKING_URI=sqlite:////tmp/store/mlflow.db python benchmarks/isoflop_windows.py --mlflow

Planted (issue 14): the Chinchilla law plus an undertraining term k/steps at a fixed batch
(analysis.synthetic.undertrained_isoflop_runs), one fixed list of 21 sizes for 13 budgets over six
decades, 1% noise; the true N* per budget is found numerically, the true a by OLS over budgets.
Prints |a - a_true| (median, 90th percentile, share < 0.01) for each window rule of
analysis.minimum.profile_minimum. --mlflow: approaches 1-3 on the runs of one design in the store
(allocation.isoflop with each rule; envelope and parametric through analysis.report; beside them the
envelope of whole curves and approach 3 on approach 2's windowed runs). An adaptive study:
`--design adaptive --seeds 0`.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from analysis import allocation, load, report, synthetic
from analysis.fit import fit_chinchilla

RULES = [("within 10% of the best (default)", {}), ("within 15%", {"band": 0.15}), ("within 5%", {"band": 0.05}),
         ("5 nearest sizes", {"nearest": 5}), ("9 nearest sizes", {"nearest": 9}), ("all points", {"band": np.inf})]


def planted(seeds: int) -> None:
    sizes, budgets = np.logspace(6.5, 11.5, 21), np.logspace(17, 23, 13)
    truth = allocation.fit_loglinear(budgets, [synthetic.undertrained_optimum(C) for C in budgets]).params["s"]
    err = {k: [] for k, _ in RULES}
    for seed in range(seeds):
        df = synthetic.undertrained_isoflop_runs(sizes=sizes, budgets=budgets, noise=0.01, seed=seed)
        for k, kw in RULES:
            err[k].append(allocation.isoflop(df, n_bootstrap=0, **kw).a - truth)
    print(f"true a {truth:.4f}; |a - a_true| over {seeds} seeds at 1% noise")
    for k, v in err.items():
        e = np.abs(v)
        print(f"  {k:34s} median {np.median(e):.4f}  p90 {np.percentile(e, 90):.4f}  share < 0.01 {np.mean(e < 0.01):.2f}")


def real(design: str) -> None:
    runs = load.fitting_runs(load.load_runs())
    runs = runs[runs["design"] == design].reset_index(drop=True)
    print(f"{design}: {len(runs)} runs")
    default = None
    for k, kw in RULES:
        try:
            al = allocation.isoflop(runs, loss_col="final_val_loss", **kw)
            if not kw:      # the default window (RULES[0]): approach 3 below reuses its runs
                default = al
        except Exception as e:  # noqa: BLE001 — say why this rule has no answer, go on
            print(f"  approach 2, {k}: {e}")
            continue
        used = "; ".join(f"C={r.C:.3g} N*={r.N_opt:.3g} from {len(r.used)} runs" for r in al.table.itertuples())
        print(f"  approach 2, {k}: a = {al.a:.3f} {al.a_interval} ({used}); skipped {al.skipped}")
    curves = load.load_curves(runs["run_id"])
    res = report.build_report(runs, curves, out_dir="/tmp/isoflop_windows_report", loss_col="final_val_loss",
                              make_plots=False)
    for key in ("allocation_envelope", "allocation_parametric"):
        if key in res["sections"]:
            x = res["sections"][key]
            print(f"  {key}: a = {x['a']:.3f} {x['a_interval']} "
                  + json.dumps({k: x["extras"].get(k) for k in ("n_sizes_visited", "unidentified", "interval_note")}))
    # What the rules chosen replaced, on the same runs: the envelope of whole curves, and approach 3
    # fitted (tried, not adopted) only on the runs approach 2's windows use.
    whole = allocation.envelope(curves, runs, min_progress=0, n_bootstrap=200)
    print(f"  envelope of whole curves (min_progress=0): a = {whole.a:.3f} {whole.a_interval}")
    if default is None:
        print("  approach 3 on the default window's runs: none (the default window found no allocation)")
        return
    used = runs["run_id"].isin({i for u in default.table["used"] for i in u})
    w = runs[used]
    fit = fit_chinchilla(w["N"].to_numpy(float), w["D"].to_numpy(float), w["final_val_loss"].to_numpy(float),
                         grid="coarse", n_bootstrap=200)
    par = allocation.from_parametric(fit)
    print(f"  approach 3 on the {int(used.sum())} runs approach 2's windows use: a = {par.a:.3f} {par.a_interval}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=30, help="planted data sets (0: none, the real study only)")
    p.add_argument("--mlflow", action="store_true", help="also the isoflop runs of the MLflow store")
    p.add_argument("--design", default="isoflop")
    a = p.parse_args()
    if a.seeds > 0:
        planted(a.seeds)
    if a.mlflow:
        real(a.design)


if __name__ == "__main__":
    main()
