"""The end of a study: analyze its children, log the report to the parent, print a summary.

The fits are analysis.report's (the same code as `scaling-suite analyze`); this module adds what
only a study knows: how well early stop would have done, planned against actual wall time, and
the comparison of alpha_N with Kaplan et al. 2020 on their own parameter convention.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np

from analysis import load, report
from analysis.common import fmt, format_interval
from analysis.extrapolate import extrapolation_lines
from analysis.fit import fit_kaplan
from analysis.laws import KAPLAN_ALPHA_N
from analysis.agreement import agreement_line, allocation_block
from analysis.report import unidentified_warnings

from . import ladder as ladder_lib
from . import store, tracking
from .config import RunConfig
from .earlystop import MIN_REFERENCE
from .replay import leave_one_out
from .schedule import lr_from_history


def analyze_study(study, plan, parent, planned_seconds: float | None, n_bootstrap: int = 200) -> dict:
    import mlflow   # lazy, as everywhere in the suite: `import mlflow` alone takes ~3.5 s here

    client = mlflow.MlflowClient(tracking.tracking_uri())
    runs = newest_per_config(load.fitting_runs(load.load_runs(parent_run_id=parent.run_id, client=client)))
    out = store.scratch_dir() / "analysis"
    if runs.empty:
        print("no finished runs to analyze")
        return {}
    curves = load.load_curves(runs["run_id"], client=client)
    planned = f"{len(plan.points)} planned runs" if plan.points else f"{len(study.children)} runs placed by its search"
    notes = [f"study {parent.run_id}: mode {plan.mode}, design {plan.design}, {planned}",
             "N = non-embedding + output head (Porian et al. 2024); C = (6N + 6·depth·context·d_model)·D"]
    result = report.build_report(runs, curves, out_dir=out, loss_col="final_val_loss", n_bootstrap=n_bootstrap,
                                 source=f"MLflow study {parent.run_id}", notes=notes)
    facts = {"learning_rate": lr_facts(getattr(study, "lr_info", None) or {}, runs),
             "early_stop": early_stop_errors(runs), "study_prediction": study_prediction(runs, curves),
             "compute": compute_spent(runs),
             "wall_seconds": study.wall_seconds, "planned_seconds": planned_seconds,
             "monotone_in_N": monotone_in_N(runs),
             "artifact_uri": client.get_run(parent.run_id).info.artifact_uri}
    # Kaplan's alpha_N is defined on non-embedding parameters: fit their L(N, D) form on that axis.
    try:
        k = fit_kaplan(runs["N_nonembed"].to_numpy(float), runs["D"].to_numpy(float),
                       runs["final_val_loss"].to_numpy(float), n_bootstrap=n_bootstrap)
        facts["alpha_N"] = {"value": k.params["alpha_N"], "interval": k.intervals.get("alpha_N"),
                            "convention": "N_nonembed, Kaplan et al. 2020 eq. 1.5 form",
                            "support": k.support["alpha_N"]}
        if "alpha_N" in k.unidentified:
            facts["alpha_N"]["unidentified"] = k.unidentified["alpha_N"]
    except Exception as e:  # noqa: BLE001 — a section the data cannot support is skipped, with why
        facts["alpha_N"] = {"skipped": f"{type(e).__name__}: {e}"}
    (out / "study.json").write_text(json.dumps(facts, indent=1, default=_json))
    files = result.get("files", []) + [str(out / "study.json")]
    for f in files:
        parent.log_artifact(f, "analysis")
    metrics = {k: v for k, v in result.get("metrics", {}).items() if _finite(v)}
    es = facts["early_stop"]
    metrics.update({k: es[k] for k in ("predict_error_median", "predict_error_max", "early_stop_saving",
                                       "early_stopped_saving") if _finite(es.get(k))})
    sp = facts["study_prediction"]
    metrics.update({f"study_{k}": sp[k] for k in ("predict_error_median", "predict_error_max") if _finite(sp.get(k))})
    if _finite(facts["alpha_N"].get("value")) and "unidentified" not in facts["alpha_N"]:
        metrics["alpha_N"] = facts["alpha_N"]["value"]
    metrics.update({k: v for k, v in facts["compute"].items() if _finite(v)})
    parent.log_metrics(metrics, step=0)
    text = summary(result, facts, plan)
    parent.log_text(text, "analysis/summary.txt")
    print(text)
    result["study"] = facts
    return result


def compute_spent(runs) -> dict:
    """FLOPs the study's runs actually computed (their C_spent: a WSD branch computes only its
    cooldown, plan.py) against the same runs trained independently (the sum of their C)."""
    C = runs["C"].astype(float)
    spent = runs["C_spent"].astype(float).fillna(C)     # runs from before C_spent existed: all of C
    independent = float(C.sum())
    return {"C_spent": float(spent.sum()), "C_independent": independent,
            "C_spent_ratio": float(spent.sum()) / independent if independent > 0 else math.nan,
            "branches": int(runs["branch_of"].notna().sum())}


def lr_facts(info: dict, runs) -> dict:
    """Where the study's learning rates came from (law, mup, rule, fixed), the range used, and a
    warning when one fixed value spans more than a decade of N: below ~100M parameters the optimal
    lr moves with size, so a fixed one bends the fitted exponents (Porian et al. 2024 §4; Lourie et
    al. 2026)."""
    out = {k: info.get(k) for k in ("lr", "lr_source", "lr_law_run_id", "lr_rule")}
    lrs = runs["lr"].astype(float) if "lr" in runs else None
    N = runs["N"].astype(float)
    if lrs is not None and len(lrs):
        out["lr_range"] = [float(lrs.min()), float(lrs.max())]
    decades = float(np.log10(N.max() / N.min())) if len(N) else 0.0
    out["N_decades"] = decades
    fixed = out.get("lr_source") == "fixed" or (lrs is not None and len(lrs) and lrs.nunique() == 1
                                                 and out.get("lr_source") in (None, "fixed"))
    if fixed and decades > 1:
        out["warning"] = (f"one fixed learning rate ({lrs.iloc[0]:g}) across {decades:.1f} decades of N: small-N "
                          "losses are confounded by it (Porian et al. 2024; Lourie et al. 2026); run `scaling-suite "
                          "tune` and use lr=auto")
    return out


def newest_per_config(runs):
    """One row per configuration. A study re-run after a code change retrains its configurations
    (sweep.run_child matches the code version), and the older finished run stays beside the new one
    under the parent: fitting both would count that point twice. Keeps the newest run of each."""
    cols = [f"param_{f.name}" if f"param_{f.name}" in runs else f.name for f in fields(RunConfig)
            if f"param_{f.name}" in runs or f.name in runs]
    if runs.empty or not cols or not runs.duplicated(cols).any():
        return runs
    keep = runs.sort_values("start_time", kind="stable").drop_duplicates(cols, keep="last")
    print(f"{len(runs) - len(keep)} older run(s) of configurations that were re-run (new code version) left out of the fit")
    return keep.sort_index().reset_index(drop=True)


def early_stop_errors(runs) -> dict:
    """Relative error of the final-loss prediction made at predict_from, against the real end."""
    def finite(col):
        return runs[col].astype(float).dropna().to_numpy()
    errs, stable, saves = np.abs(finite("predict_error")), np.abs(finite("predict_error_stable")), \
        finite("early_stop_saving")
    out = {"n_runs": len(errs)}
    if len(errs):
        out.update(predict_error_median=float(np.median(errs)), predict_error_max=float(np.max(errs)))
    if len(stable):
        out.update(stable_error_median=float(np.median(stable)), stable_error_max=float(np.max(stable)))
    if len(saves):
        out["early_stop_saving"] = float(np.mean(saves))
    if "predicted" in runs and runs["predicted"].astype(bool).any():
        # Runs early stop really stopped (early_stop=true): the compute they did not spend.
        stopped = runs[runs["predicted"].astype(bool)]
        C = stopped["C"].astype(float)
        out.update(early_stopped=int(len(stopped)),
                   early_stopped_saving=float(1 - stopped["C_spent"].astype(float).fillna(C).sum() / C.sum()))
    return out


def reference_curve(r, curves) -> tuple:
    """What replay.leave_one_out takes for one finished run (a row of RUNS) of CURVES (load.load_curves):
    (progress, val_loss, final, N, D, lr at every step from the logged history, peak lr, N_nonembed)."""
    c = curves[curves["run_id"] == r["run_id"]].sort_values("tokens")
    v = c[c["val_loss"].notna()]
    lrs = lr_from_history(c["tokens"].to_numpy(float), c["lr"].to_numpy(float), float(r["D"]),
                          _param(r, "batch_tokens"))
    return ((v["tokens"] / r["D"]).to_numpy(float), v["val_loss"].to_numpy(float), float(r["final_val_loss"]),
            float(r["N"]), float(r["D"]), lrs, _param(r, "lr"), _param(r, "N_nonembed"))


def _param(r, key) -> float:
    """A numeric param of a run row, NaN when absent or not a number."""
    try:
        return float(r.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan


def study_prediction(runs, curves, at: float = 0.25) -> dict:
    """The study predictor (earlystop.predict_from_study) measured leave-one-run-out: each finished
    run's final loss predicted from its first `at` of the schedule with the study's OTHER finished
    runs of the same schedule as reference, against the real end. Runs whose final loss is itself
    a prediction (early stop) are neither predicted nor used."""
    if curves is None or curves.empty or runs.empty:
        return {"n_runs": 0}
    real = runs[~runs["predicted"].astype(bool)] if "predicted" in runs else runs
    key = [c for c in ("schedule", "cooldown_frac", "warmup_max_frac") if c in real]
    errs = {}
    for _, g in (real.groupby(key, dropna=False) if key else [(None, real)]):
        data = {}
        for _, r in g.iterrows():
            data[r["run_id"]] = reference_curve(r, curves)
        errs.update({k: v[1] for k, v in leave_one_out(data, at=at).items()})
    out = {"n_runs": len(errs), "at": at}
    if errs:
        e = np.abs(list(errs.values()))
        out.update(predict_error_median=float(np.median(e)), predict_error_max=float(np.max(e)))
    return out


def monotone_in_N(runs) -> dict:
    """Does final loss fall with N where it should: within each fixed-D group (n_sweep), and on the
    small-N side of each IsoFLOP budget (below the best size)?"""
    checks = {}
    if "C_budget" in runs and runs["C_budget"].notna().any():
        for C, g in runs.groupby("C_budget"):
            g = g.sort_values("N")
            best = int(np.argmin(g["final_val_loss"].to_numpy()))
            side = g["final_val_loss"].to_numpy()[:best + 1]
            checks[f"C={C:.3g}"] = bool(np.all(np.diff(side) < 0)) if len(side) > 1 else None
    for D, g in runs[runs["design"] == "n_sweep"].groupby("D") if "design" in runs else []:
        loss = g.sort_values("N")["final_val_loss"].to_numpy()
        checks[f"D={D:.3g}"] = bool(np.all(np.diff(loss) < 0))
    return checks


def summary(result: dict, facts: dict, plan) -> str:
    s = result.get("sections", {})
    lines = [f"\n=== {plan.mode} study: {result['data']['n_runs']} runs ==="]
    lr = facts.get("learning_rate") or {}
    if lr.get("lr_source"):
        rng = lr.get("lr_range")
        lines.append(f"learning rates: {lr['lr_source']} ({lr.get('lr_rule') or ''})"
                     + (f", {rng[0]:.3g}..{rng[1]:.3g}" if rng and rng[0] != rng[1] else ""))
    if lr.get("warning"):
        lines.append(f"warning: {lr['warning']}")
    a = facts["alpha_N"]
    if "unidentified" in a:
        lines.append(f"L(N): alpha_N NOT IDENTIFIED by these runs ({a['convention']}): the N term changes the "
                     f"fitted loss across only {a['support']['seen']} of {a['support']['distinct']} sizes; the fit's "
                     f"{fmt(a['value'], '.3f')} {format_interval(a.get('interval'))} is not a measurement. "
                     "The larger sizes must beat the smaller beyond the noise at comparable D: an n_sweep design "
                     "separates N from D, and per-size tuned lrs (`scaling-suite tune`) remove the lr confound")
    elif "value" in a:
        iv = a.get("interval")
        lines.append(f"L(N): alpha_N = {a['value']:.3f} {format_interval(iv)}".rstrip()
                     + f"  (Kaplan et al. 2020: {KAPLAN_ALPHA_N}; {a['convention']})")
    lines += allocation_lines(s)
    if "chinchilla" in s:
        p, iv = s["chinchilla"]["params"], s["chinchilla"].get("intervals", {})
        lines.append("Chinchilla L(N,D): " + ", ".join(f"{k}={fmt(v, '.4g')}{format_interval(iv.get(k))}" for k, v in p.items()))
    # Every other law the data do not identify (the study's own alpha_N line above covers Kaplan's).
    lines += [f"    WARNING {w}" for w in unidentified_warnings(s, skip=("kaplan",))]
    for key, label in (("chinchilla_loo", "leave-one-out"), ("chinchilla_holdout_N", "held-out largest N"),
                       ("chinchilla_holdout_C", "held-out largest C"), ("L_N_holdout", "L(N) held-out largest N")):
        if key in s and _finite(s[key].get("mean_abs_rel_error")):
            lines.append(f"{label}: mean |relative error| {s[key]['mean_abs_rel_error']:.2%}")
    lines += extrapolation_lines(result.get("extrapolations", []))
    c = facts["compute"]
    lines.append(f"compute: {c['C_spent']:.3g} FLOPs spent; the same runs trained independently: "
                 f"{c['C_independent']:.3g} FLOPs; ratio {c['C_spent_ratio']:.2f}"
                 + (f" ({c['branches']} runs were WSD cooldown branches of a shared trunk, Hägele et al. 2024)"
                    if c["branches"] else ""))
    es = facts["early_stop"]
    if "predict_error_median" in es:
        lines.append(f"final-loss prediction logged at 25% of each run (from its own curve until {MIN_REFERENCE} runs of "
                     f"its schedule had finished, then from the study): median error {es['predict_error_median']:.1%}, "
                     f"max {es['predict_error_max']:.1%} over {es['n_runs']} runs; early stop would have saved "
                     f"{es.get('early_stop_saving', 0):.0%} of the compute")
    if es.get("early_stopped"):
        lines.append(f"early stop stopped {es['early_stopped']} run(s): they spent {es['early_stopped_saving']:.0%} less "
                     "compute than trained to the end; their final losses are predictions (tag predicted=true)")
    sp = facts.get("study_prediction") or {}
    if "predict_error_median" in sp:
        lines.append(f"study predictor (the other runs' final/partial ratio with the same size's law), "
                     f"leave-one-run-out from {sp['at']:.0%}: median error {sp['predict_error_median']:.1%}, "
                     f"max {sp['predict_error_max']:.1%} over {sp['n_runs']} runs")
    mono = facts["monotone_in_N"]
    if mono:
        lines.append("loss falls with N (below each optimum): " + ", ".join(f"{k} {v}" for k, v in mono.items()))
    if facts["planned_seconds"]:
        lines.append(f"wall time: planned {facts['planned_seconds']:.0f}s, actual {facts['wall_seconds']:.0f}s")
    else:
        lines.append(f"wall time: {facts['wall_seconds']:.0f}s")
    if result.get("skipped"):
        lines.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()))
    where = facts.get("artifact_uri", "")
    lines += [f"plots (logged to the study run, {where}/analysis):"]
    lines += [f"    {Path(f).name}" for f in result.get("files", []) if f.endswith(".png")]
    return "\n".join(lines)


def allocation_lines(s: dict) -> list[str]:
    """The three approaches' exponents, intervals, windows and per-budget minima (report sections S)."""
    lines: list[str] = []
    for key in ("allocation_isoflop", "allocation_envelope", "allocation_parametric"):
        if key in s:
            al = s[key]
            lines += allocation_block(key, al)
            if key == "allocation_isoflop":
                ex = al.get("extras", {})
                lines.append(f"    parabola through {ex.get('window', '')}; intervals: {ex.get('interval_method', '')}")
                boot = ex.get("bootstrap_interval")
                if boot:   # the resampling check beside the OLS interval (analysis.allocation.isoflop says why)
                    lines.append("    bootstrap over runs, beside it: " + (
                        f"a {format_interval(boot['a'])} ({boot['resamples_used']}/{boot['n_bootstrap']} resamples)"
                        if "a" in boot else f"undefined ({boot['note']})"))
            if key == "allocation_envelope":
                lines.append(f"    the envelope visits {al.get('extras', {}).get('n_sizes_visited')} distinct size(s); "
                             f"intervals: {al.get('extras', {}).get('interval_method', '')}")
            for row in al.get("table", []) if key == "allocation_isoflop" else []:
                ratio = row["D_opt"] / row["N_opt"] if row["D_opt"] is not None and row["N_opt"] else None
                lines.append(f"    C={fmt(row['C'])}: N*={fmt(row['N_opt'])} {n_star_interval(row, al.get('level') or 0.95)}, "
                             f"D*={fmt(row['D_opt'])}, D/N={fmt(ratio, '.1f')}, "
                             f"from {len(row.get('used') or [])} of {row.get('n_runs')} runs")
            lines += [f"    budget {b} left out: {why}" for b, why in (al.get("skipped") or {}).items()]
    if "allocation_agreement" in s:
        lines.append(agreement_line(s["allocation_agreement"]))
    return lines


def n_star_interval(row: dict, level: float = 0.95) -> str:
    """A budget's N* interval, or why it has none: with the 3-5 runs of an adaptive budget, many
    resamples of its runs keep < 3 sizes (analysis.minimum.profile_minimum leaves the interval out
    when more than 1 - level of them have no vertex)."""
    iv = format_interval([row.get("N_lo"), row.get("N_hi")])
    if iv:
        return iv
    und = row.get("boot_undefined")
    if _finite(und) and und > 1 - level:
        return f"(no interval: {und:.0%} of resamples lack a vertex)"
    if _finite(und):      # an interval was drawn and both its ends are infinite (None in the report)
        return "(unbounded: resamples put the minimum beyond the sizes on both sides)"
    return "(no interval)"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _json(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def adaptive_summary(ladder, done: list, notes: list[str], validation: dict, wall: float, box: float) -> str:
    """The adaptive study's own lines: its budgets, what the box allowed, the validation run."""
    lines = [f"\n=== adaptive study: {len(done)} of {len(ladder.rungs)} planned budgets, "
             f"{sum(len(b.rows) for b in done)} runs, {wall:.0f}s of a {box:.0f}s box ==="]
    lines += [f"C={b.C:.3g}: {budget_line(b)}" for b in sorted(done, key=lambda b: b.C)]   # fills come last
    ok = [b for b in done if b.fit.get("status") == "ok"]
    if ok:
        span = math.log10(max(b.C for b in ok) / min(b.C for b in ok)) if len(ok) > 1 else 0.0
        lines.append(f"bracketed budgets: {len(ok)} of {len(done)}, spanning {span:.2f} decades of C"
                     + ("  (fewer than 3: the exponent has no interval)" if len(ok) < 3 else ""))
    lines += notes
    v = validation
    if "skipped" in v:
        lines.append(f"validation: not run: {v['skipped']}")
    elif "rel_error" in v:
        lines.append(f"validation at C={v['C']:.3g} ({v['factor']:.2g}x the largest budget), N={v['N']:,} "
                     f"({v['N'] / v['N_opt_predicted']:.2f}x the predicted N_opt {v['N_opt_predicted']:,.0f}): "
                     f"predicted {v['predicted_loss']:.4f} [{v['predicted_lo']:.4f}, {v['predicted_hi']:.4f}], "
                     f"measured {v['measured_loss']:.4f}: error {v['rel_error']:+.2%}"
                     f"{where_measured(v['measured_loss'], v['predicted_lo'], v['predicted_hi'])}")
        if v.get("epochs", 0) > ladder_lib.MAX_EPOCHS:
            lines.append(f"    the validation run repeats the training split {v['epochs']:.1f} times (over the "
                         f"{ladder_lib.MAX_EPOCHS:g} epochs of Muennighoff et al. 2023): the corpus is small for this budget")
        lines.append(f"    prediction made before the run started, from {v['law']}; the parametric fits to "
                     f"{v['n_runs_fitted']} runs (approach 3's two forms) predicted:")
        lines += [f"    {form.capitalize()}'s form {x['loss']:.4f} [{x['lo']:.4f}, {x['hi']:.4f}]"
                  f"{'' if x['identified'] else ' (NOT IDENTIFIED)'}: error {x['rel_error']:+.2%}"
                  f"{where_measured(v['measured_loss'], x['lo'], x['hi'])}" for form, x in v.get("parametric", {}).items()]
    else:
        lines.append(f"validation: the run ended {v.get('status')}")
    return "\n".join(lines)


def where_measured(measured: float, lo: float, hi: float) -> str:
    """Whether a validation run's measured loss lies in a prediction's interval: the test the study's
    law passes or fails (a law whose interval excludes the measured loss is contradicted by it)."""
    if not _finite(measured):
        return ""
    if not (_finite(lo) and _finite(hi)):
        return ", no interval"
    if lo <= measured <= hi:
        return ", inside the interval"
    return f", {'below' if measured < lo else 'above'} the interval: this law fails the test"


def budget_line(b) -> str:
    """One budget of an adaptive study (budget_search.Budget) in words."""
    f = b.fit
    where = (f"minimum at N≈{f['x_opt']:,.0f}" if f.get("status") == "ok"
             else f"no minimum located ({f.get('status')}: {f.get('reason')})")
    return f"{where} from {len(b.rows)} runs, {b.seconds:.0f}s (planned {b.estimated:.0f}s)"
