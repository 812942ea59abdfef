"""What an lr tuning run (tune.py) found: each size's optimal learning rate, the law
lr*(N) = c N^-k through those optima, logged on the tuning run, and its printed summary."""

from __future__ import annotations

import json
import math

import numpy as np

from analysis import plots
from analysis.fit import fit_lr_law
from analysis.minimum import profile_minimum

from .config import RunConfig
from .store import scratch_dir


def fit_optimum(rows: list[dict], window: float) -> dict:
    """Optimal lr of one size: a parabola in log10 lr through the completed trials within WINDOW
    decades of the best (analysis.minimum.profile_minimum), on the trials with the best trial's β2 when they
    hold 3 distinct lrs (so β2 does not masquerade as curvature), else on all. Falls back to the
    best trial when the parabola has no minimum inside the fitted points (status says which)."""

    done = [r for r in rows if r["state"] == "COMPLETE" and math.isfinite(r["final_val_loss"])]
    if not done:
        return {"status": "no_trials"}
    best = min(done, key=lambda r: r["final_val_loss"])
    same = [r for r in done if r["beta2"] == best["beta2"]]
    use = same if len({r["lr"] for r in same}) >= 3 else done
    f = profile_minimum([r["lr"] for r in use], [r["final_val_loss"] for r in use], decades=window)
    out = {"status": f["status"], "n_points": f["n_points"], "beta2_subset": use is same and use is not done,
           "best_lr": best["lr"], "best_loss": best["final_val_loss"], "best_beta2": best["beta2"],
           "lr_lo": math.nan, "lr_hi": math.nan}
    if f["status"] == "ok":
        # An end the bootstrap leaves unbounded (0 or inf: resamples whose best trial is at an edge) is NaN here.
        out.update(lr_opt=f["x_opt"], lr_lo=f["x_lo"] if f["x_lo"] > 0 else math.nan,
                   lr_hi=f["x_hi"] if f["x_hi"] < math.inf else math.nan, loss_opt=f["loss_opt"], coef=f["coef"],
                   x_center=f["x_center"], x_range=f["x_range"])
    else:
        out.update(lr_opt=best["lr"], loss_opt=best["final_val_loss"])
    return out


def summarize(sizes: list[dict], first: RunConfig, parent, key: str, key_parts: dict, wall: float) -> dict:
    """Compute saved, the law with its interval, lr_base under μP; logged to PARENT."""

    rows = [r for s in sizes for r in s["trials"]]
    trained = sum(r["flops_trained"] for r in rows)
    full = sum(r["C"] for r in rows)
    saved = 1 - trained / full if full else math.nan
    n_pruned = sum(r["state"] == "PRUNED" for r in rows)
    out = {"lr_law_key": key, "lr_law_key_parts": key_parts, "sizes": sizes, "flops_trained": trained,
           "flops_if_finished": full, "compute_saved": saved, "trials": len(rows), "trials_pruned": n_pruned,
           "trials_failed": sum(r["state"] == "FAIL" for r in rows), "wall_seconds": wall,
           "tokens_per_param": first.tokens_per_param, "parametrization": first.parametrization}
    metrics = {"flops_trained": trained, "flops_if_finished": full, "trials_run": len(rows),
               "trials_pruned": n_pruned, "wall_seconds": wall}
    if math.isfinite(saved):
        metrics["compute_saved"] = saved
    have = [s for s in sizes if "lr_opt" in s["optimum"]]
    if len(have) >= 2:
        law = fit_lr_law([s["N"] for s in have], [s["optimum"]["lr_opt"] for s in have])
        out["law"] = law.to_dict()
        out["law_report"] = law.report()
        metrics.update(lr_law_c=law.params["c"], lr_law_k=law.params["k"])
        for p in ("c", "k"):
            if p in law.intervals:
                metrics[f"lr_law_{p}_lo"], metrics[f"lr_law_{p}_hi"] = law.intervals[p]
        if first.parametrization == "mup":
            base = min(have, key=lambda s: abs(math.log(s["d_model"] / first.mup_base_width)))
            out["lr_base"] = base["optimum"]["lr_opt"]
            out["lr_base_d_model"] = base["d_model"]
            metrics["lr_base"] = out["lr_base"]
    else:
        out["law_error"] = f"only {len(have)} size(s) have an optimum; a law needs 2"
    parent.log_metrics(metrics, step=0)
    parent.set_tags({"lr_law_status": "ok" if "law" in out else out["law_error"]})
    parent.log_text(json.dumps(out, indent=1, default=_json), "lr_law.json")
    try:
        path = scratch_dir() / "lr_law.png"
        plots.lr_law(sizes, out.get("law"), out["tokens_per_param"], out["parametrization"], path=path)
        parent.log_artifact(path, "plots")
    except Exception as e:  # noqa: BLE001 — a plot failure must not lose the law
        parent.set_tags({"plot_error": f"{type(e).__name__}: {e}"[:5000]})
    return out


def _json(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


def summary_text(out: dict) -> str:
    lines = [f"\n=== lr tuning {out.get('run_id', '')}: {len(out['sizes'])} sizes at D/N = {out['tokens_per_param']:g}, "
             f"{out['parametrization']} ==="]
    for s in out["sizes"]:
        o = s["optimum"]
        if "lr_opt" not in o:
            lines.append(f"  depth {s['depth']} N={s['N']:,}: no optimum ({o['status']})")
            continue
        iv = f" [{o['lr_lo']:.3g}, {o['lr_hi']:.3g}]" if math.isfinite(o["lr_lo"]) else ""
        st = [r["state"] for r in s["trials"]]
        lines.append(f"  depth {s['depth']} N={s['N']:,} D={s['D']:,}: lr_opt = {o['lr_opt']:.4g}{iv} ({o['status']}), "
                     f"best trial lr {o['best_lr']:.3g} beta2 {o['best_beta2']:g} loss {o['best_loss']:.4f}; "
                     f"{st.count('COMPLETE')} complete, {st.count('PRUNED')} pruned, {st.count('FAIL')} failed")
    if "law" in out:
        p, iv = out["law"]["params"], out["law"]["intervals"]
        fmt = lambda k: f" [{iv[k][0]:.4g}, {iv[k][1]:.4g}]" if k in iv and iv[k][0] is not None else ""  # noqa: E731
        lines.append(f"lr law: lr*(N) = c N^-k, c = {p['c']:.4g}{fmt('c')}, k = {p['k']:.4f}{fmt('k')} "
                     f"({100 * out['law']['level']:g}% t-intervals, {out['law']['n_points']} sizes)")
    else:
        lines.append(f"no lr law: {out.get('law_error')}")
    if "lr_base" in out:
        lines.append(f"μP base lr (d_model {out['lr_base_d_model']}): {out['lr_base']:.4g}")
    lines.append(f"pruning: {out['trials_pruned']} of {out['trials']} trials pruned; compute saved "
                 f"{out['compute_saved']:.1%} ({out['flops_trained']:.3g} of {out['flops_if_finished']:.3g} training FLOPs)")
    lines.append(f"wall time: {out['wall_seconds']:.0f}s")
    return "\n".join(lines)
