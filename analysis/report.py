"""Everything applicable to one set of runs: fits, allocation, validation, extrapolation, figures,
written as report.md + report.json (+ PNGs), and the `scaling-suite analyze` / `python -m analysis`
command line around it.

Sections that the data cannot support are skipped with the reason (stated in the report), never
crash the whole report: a quick study with four runs still gets the L(N) fit and its plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from scaling_suite.errors import SuiteError

from . import allocation, extrapolate, plots
from .agreement import agreement_line, allocation_agreement, allocation_block
from .common import fmt, format_interval, jsonable, n_distinct
from .crossval import holdout_largest, loo_errors
from .fit import fit_chinchilla, fit_kaplan, fit_power_law
from .inputs import add_arguments, load_inputs  # noqa: F401  (CLI plumbing lives in inputs.py)

SKIPPABLE = (SuiteError, ValueError, ArithmeticError, np.linalg.LinAlgError)


class _Report:
    """Collects sections, figures and skip reasons while build_report runs."""

    def __init__(self, out_dir: Path, make_plots: bool):
        self.out = out_dir
        self.plots = make_plots
        self.sections: dict = {}
        self.text: list[tuple[str, str]] = []
        self.skipped: dict = {}
        self.extrapolations: list = []
        self.files: list[str] = []
        self.metrics: dict = {}

    def run(self, name, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except SKIPPABLE as exc:
            self.skipped[name] = str(exc)
            return None

    def add(self, name, obj, text=None):
        self.sections[name] = obj.to_dict() if hasattr(obj, "to_dict") else jsonable(obj)
        self.text.append((name, text if text is not None else obj.report()))

    def figure(self, name, fn, *args, **kw):
        if self.plots:
            path = self.out / f"{name}.png"
            if self.run(f"plot {name}", fn, *args, path=path, **kw) is not None:
                self.files.append(str(path))

    def fit_metrics(self, prefix, fit, only=None):
        """`<prefix>_<param>` metrics of a fit, except the terms it does not identify (an MLflow
        metric carries no warning), and `<prefix>_identified` (1/0)."""
        sup = fit.support or {}
        bad = {k for e in (fit.unidentified or {}) for k in (e, sup[e]["amplitude"])}
        for k, v in fit.params.items():
            if k not in bad and (only is None or k in only):
                self.metrics[f"{prefix}_{k}"] = v
        self.metrics[f"{prefix}_identified"] = float(fit.identified)

    def needs_identified(self, name, fit, label) -> bool:
        """True if `fit` identifies every term; else skip section `name`, which is derived from it."""
        if fit.identified:
            return True
        self.skipped[name] = f"the {label} fit does not identify {', '.join(fit.unidentified)} (see its section)"
        return False

    def extrapolation(self, key, fn, fit, target):
        ex = self.run(f"extrapolation {key}", fn, fit, target)
        if ex is not None:
            self.extrapolations.append(ex)
            self.metrics[f"pred_loss_{key}"] = ex.loss


def _num(v, spec: str) -> str:
    """A number for the report's text; None (a NaN after jsonable, e.g. a held-out refit whose
    prediction overflowed) reads as 'n/a' rather than breaking the whole report."""
    return "n/a" if v is None or not np.isfinite(v) else format(v, spec)


def _distinct(x, rel=0.01) -> int:
    """Distinct values of a positive input (common.n_distinct: the fits' gap rule, one rule everywhere)."""
    return n_distinct(np.log(np.asarray(x, dtype=float)), rel)


ISOFLOP_DESIGNS = ("isoflop", "adaptive")   # designs whose runs are grouped by compute budget


def _design_groups(df) -> dict:
    """design -> rows. Runs carry a design tag from the planner; data without one (a CSV) is
    classified by shape: constant D = n_sweep, constant N = d_sweep; IsoFLOP budgets are found
    from C_budget / clustered C in any case."""
    if "design" in df and df["design"].notna().any():
        return {d: g for d, g in df.groupby("design") if d in ("n_sweep", "d_sweep")}
    if _distinct(df["D"], 0.05) == 1 and _distinct(df["N"]) >= 3:
        return {"n_sweep": df}
    if _distinct(df["N"], 0.05) == 1 and _distinct(df["D"]) >= 3:
        return {"d_sweep": df}
    return {}


def _identified(*fits):
    """The first of the fits that exists and identifies its law, or None."""
    return next((f for f in fits if f is not None and f.identified), None)


def _frontier(df, loss_col):
    """Final losses that beat every run with less compute: the data's compute-efficient frontier."""
    d = df.sort_values("C")
    best = d[loss_col].cummin()
    return d[d[loss_col] <= best + 1e-12].drop_duplicates("C")


def build_report(runs_df: pd.DataFrame, curves_df: pd.DataFrame | None = None, out_dir="out/analysis",
                 target_N: float = extrapolate.DEFAULT_TARGET_N, target_C: float = extrapolate.DEFAULT_TARGET_C,
                 loss_col: str = "loss", grid="published", n_bootstrap: int = 1000, seed: int = 0,
                 notes=(), make_plots: bool = True, source: str = "") -> dict:
    """Run every applicable analysis on runs_df (columns N, D, C, loss_col; optional design,
    C_budget) and optional curves (analysis.load.load_curves format); write report.md, report.json
    and figures into out_dir; return the JSON dict (with a `files` list)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = [c for c in ("N", "D", "C", loss_col) if c not in runs_df]
    if missing:
        raise SuiteError(f"runs need column(s) {', '.join(missing)}")
    df = runs_df[np.isfinite(runs_df[loss_col].astype(float))].reset_index(drop=True)
    if df.empty:
        raise SuiteError("no runs with a finite loss to analyze")
    R = _Report(out, make_plots)
    N, D, C, y = (df[c].to_numpy(float) for c in ("N", "D", "C", loss_col))
    data = {"source": source, "n_runs": int(len(df)), "loss_col": loss_col,
            "N_range": [N.min(), N.max()], "D_range": [D.min(), D.max()], "C_range": [C.min(), C.max()],
            "designs": sorted(map(str, df["design"].dropna().unique())) if "design" in df else [],
            "predicted_final_losses": int(df["predicted"].sum()) if "predicted" in df else 0,
            "notes": list(notes)}
    boot = dict(n_bootstrap=n_bootstrap, seed=seed)

    chin, par = _parametric(R, df, N, D, C, y, grid, boot, target_N, target_C)
    lN, lD = _one_variable_laws(R, df, loss_col, boot, target_N)
    iso, env, lC = _allocations(R, df, curves_df, loss_col, boot, target_C)
    allocs = [a for a in (iso, env, par) if a is not None]
    agree = allocation_agreement(allocs)
    if agree is not None:
        R.add("allocation_agreement", agree, agreement_line(agree))
        R.metrics["alloc_agree"] = float(agree["agree"])

    # Figures.
    # A law is drawn through the points (and out to target_N) only where the data identify it.
    R.figure("loss_vs_N", plots.loss_vs_N, df, fit=_identified(lN, chin), target_N=target_N, loss_col=loss_col)
    R.figure("loss_vs_D", plots.loss_vs_D, df, fit=_identified(lD), loss_col=loss_col)
    R.figure("loss_vs_C", plots.loss_vs_C, df, curves_df, env, _identified(lC), loss_col=loss_col)
    if allocs:
        R.figure("allocation", plots.optimal_allocation, allocs)
    if curves_df is not None and len(curves_df):
        R.figure("learning_curves", plots.learning_curves, curves_df, df if "run_id" in df else None)
    return _write(R, data)


def _parametric(R: _Report, df, N, D, C, y, grid, boot: dict, target_N: float, target_C: float):
    """Parametric L(N, D) (Hoffmann et al. 2022 §3.3) with its validation, Kaplan's form, and the
    allocation and extrapolations it gives: (chinchilla fit, parametric allocation), None where not made."""
    chin = par = None
    if len(df) >= 10 and _distinct(N) >= 3 and _distinct(D) >= 3:
        chin = R.run("chinchilla", fit_chinchilla, N, D, y, grid=grid, **boot)
    else:
        R.skipped["chinchilla"] = (f"needs >= 10 runs with >= 3 distinct N and D; have {len(df)} runs, "
                                   f"{_distinct(N)} N, {_distinct(D)} D")
    if chin is not None:
        R.add("chinchilla", chin)
        R.fit_metrics("chinchilla", chin)
        loo = _loo(R, "chinchilla", chin, N, D, y)
        for by in ("N", "C"):
            h = R.run(f"chinchilla holdout {by}", holdout_largest, chin, N, D, loss=y, by=by, C=C)
            if h is not None:
                R.add(f"chinchilla_holdout_{by}", h, f"held out the largest {by} ({h['n_heldout']} runs, "
                      f"trained on {by} <= {_num(h['max_train'], '.3g')}): mean |rel. error| "
                      f"{_num(h['mean_abs_rel_error'], '.4f')}")
                R.metrics[f"chinchilla_holdout_{by}_mean_abs_rel_error"] = h["mean_abs_rel_error"]
        kap = R.run("kaplan", fit_kaplan, N, D, y, **boot)
        if kap is not None:
            R.add("kaplan", kap)
            R.fit_metrics("kaplan", kap, only=("alpha_N", "alpha_D"))
        kap_loo = _loo(R, "kaplan", kap, N, D, y) if kap is not None else None
        par = _approach_3(R, {"chinchilla": (chin, loo), "kaplan": (kap, kap_loo)})
        # Extrapolations stay with the Chinchilla form whichever form approach 3 takes: Kaplan's has no
        # irreducible loss E, so far out it falls towards 0 (Hoffmann et al. 2022 §3.3 on why E is there).
        if R.needs_identified("extrapolation with the Chinchilla law", chin, "Chinchilla"):
            R.extrapolation("N_chinchilla", extrapolate.at_N, chin, target_N)
            R.extrapolation("C_chinchilla", extrapolate.at_C, chin, target_C)
        R.figure("residuals_chinchilla", plots.residuals, chin, N, D, loss=y)
    return chin, par


FORMS = {"chinchilla": "Chinchilla's E + A/N^alpha + B/D^beta", "kaplan": "Kaplan's [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D"}


def _loo(R: _Report, form: str, fit, N, D, y):
    """The fit's leave-one-run-out errors, with their section <form>_loo and metric (or None)."""
    loo = R.run(f"{form} LOO", loo_errors, fit, N, D, loss=y)
    if loo is not None:
        summary = {"mean_abs_rel_error": float(np.mean(np.abs(loo))), "max_abs_rel_error": float(np.max(np.abs(loo)))}
        R.add(f"{form}_loo", summary, "leave-one-out: mean |rel. error| {mean_abs_rel_error:.4f}, "
              "max {max_abs_rel_error:.4f}".format(**summary))
        R.metrics[f"{form}_loo_mean_abs_rel_error"] = summary["mean_abs_rel_error"]
    return loo


def _approach_3(R: _Report, fits: dict):
    """Approach 3's allocation from the parametric form that predicts left-out runs best: FITS maps a
    form (analysis.laws.PARAMETRIC) to (its fit, its leave-one-out errors), None where not made.
    Hoffmann et al. 2022 §3.3 fit their additive form; Kaplan et al. 2020's eq. 1.5 lets N and D
    interact (a larger model gains more from more data). On this suite's small models the interacting
    form predicts held-out runs better in every stored study, the additive one on Hoffmann et al.'s
    own runs (docs/analysis.md), so the data choose, by one rule for every study: the lower mean
    |leave-one-run-out error| among the forms whose fit identifies every term (from a law the data do
    not identify, an allocation would be a number without meaning, e.g. a = 0.013 from alpha = 47)
    and whose error is finite. Every candidate's a is logged; the note names every form left out."""
    cands, out = {}, []
    for form, (fit, loo) in fits.items():
        err = float(np.mean(np.abs(loo))) if loo is not None else float("nan")
        why = ("not fitted" if fit is None else "not identified" if not fit.identified
               else "no leave-one-out error" if not np.isfinite(err) else "")
        al = None if why else R.run(f"allocation parametric {form}", allocation.from_parametric, fit)
        if al is None:
            out.append(f"{form}: {why or 'no allocation'}")
            continue
        cands[form] = (err, al)
        R.metrics[f"alloc_a_parametric_{form}"] = al.a
    if not cands:
        chin = fits["chinchilla"][0]
        if chin is not None and not chin.identified:
            R.needs_identified("allocation parametric", chin, "Chinchilla")
        else:
            R.skipped["allocation parametric"] = "; ".join(out)
        return None
    form = min(cands, key=lambda f: cands[f][0])
    par = cands[form][1]
    others = [f"{f}: {e:.2%}, a = {al.a:.3f}" + (f" {format_interval(al.a_interval)}" if np.all(np.isfinite(al.a_interval))
                                                 else "") for f, (e, al) in cands.items() if f != form] + out
    par.extras["form_note"] = (f"form: {FORMS[form]}, leave-one-run-out mean |error| {cands[form][0]:.2%}"
                               + (f" (beside it {'; '.join(others)})" if others else ""))
    par.extras["loo_by_form"] = {f: e for f, (e, _) in cands.items()}
    R.add("allocation_parametric", par)
    R.metrics["alloc_a_parametric"] = par.a
    R.metrics["alloc_parametric_kaplan"] = float(form == "kaplan")     # which form the a above is from
    return par


def _one_variable_laws(R: _Report, df, loss_col: str, boot: dict, target_N: float):
    """One-variable laws per design (Kaplan et al. 2020 §1.2 forms with an offset): (L(N), L(D))."""
    lN = lD = None
    groups = _design_groups(df)
    for design, g in groups.items():
        x_name = "N" if design == "n_sweep" else "D"
        f = R.run(f"L({x_name}) {design}", fit_power_law, g[x_name], g[loss_col], x_name=x_name, **boot)
        if f is None:
            continue
        R.add(f"L_{x_name}_{design}", f)
        R.fit_metrics(f"L_{x_name}", f, only=("alpha",))
        h = R.run(f"L({x_name}) holdout", holdout_largest, f, g[x_name], loss=g[loss_col])
        if h is not None:
            R.add(f"L_{x_name}_holdout", h, f"L({x_name}) held out the largest {x_name} ({h['n_heldout']} runs): "
                  f"mean |rel. error| {_num(h['mean_abs_rel_error'], '.4f')}")
        if x_name == "N":
            lN = f
            if R.needs_identified("extrapolation with L(N)", f, "L(N)"):
                R.extrapolation("N_L_N", extrapolate.at_N, f, target_N)
        else:
            lD = f
    if not groups:
        R.skipped["L(N), L(D)"] = "no n_sweep/d_sweep runs (and D or N is not constant across the runs)"
    return lN, lD


def _allocations(R: _Report, df, curves_df, loss_col: str, boot: dict, target_C: float):
    """Compute-optimal allocation, approaches 2 and 1 (Hoffmann et al. 2022 §3.2, §3.1), and L(C)
    on the lower envelope: (isoflop allocation, envelope allocation, L(C) fit)."""
    # Tagged n_sweep/d_sweep runs are not IsoFLOP profiles; untagged ones (optimizer trials at one
    # budget, CSV rows) may be, and budgets with too few sizes are skipped with the reason anyway.
    # An adaptive study's runs are IsoFLOP profiles placed by its search (scaling_suite/adaptive.py).
    iso_df = df
    if "design" in df and df["design"].notna().any():
        iso_df = df[df["design"].isna() | df["design"].isin(ISOFLOP_DESIGNS)]
    iso = R.run("allocation isoflop", allocation.isoflop, iso_df, loss_col=loss_col, **boot)
    if iso is not None:
        R.add("allocation_isoflop", iso)
        R.metrics["alloc_a_isoflop"] = iso.a
        R.figure("isoflop", plots.isoflop_curves, iso_df, iso, loss_col=loss_col)
    env = None
    if curves_df is not None and len(curves_df):
        env = R.run("allocation envelope", allocation.envelope, curves_df, df if "run_id" in df else None, **boot)
        if env is not None:
            R.add("allocation_envelope", env)
            R.metrics["alloc_envelope_sizes"] = env.extras["n_sizes_visited"]
            R.metrics["alloc_envelope_identified"] = float(env.identified)
            if env.identified:        # an MLflow metric carries no warning (as for the fits' terms)
                R.metrics["alloc_a_envelope"] = env.a
    # L(C) on the lower envelope: of the curves when there are any, else of the final losses.
    pts = env.table if env is not None else _frontier(df, loss_col).rename(columns={loss_col: "loss_opt"})
    lC = None
    if len(pts) >= 4:
        lC = R.run("L(C) envelope", fit_power_law, pts["C"], pts["loss_opt"], x_name="C", **boot)
    else:
        R.skipped["L(C) envelope"] = f"{len(pts)} envelope points; a fit of E + A C^-alpha needs >= 4"
    if lC is not None:
        R.add("L_C_envelope", lC)
        R.fit_metrics("L_C", lC, only=("alpha",))
        if R.needs_identified("extrapolation with L(C)", lC, "L(C)"):
            R.extrapolation("C_L_C", extrapolate.at_C, lC, target_C)
    return iso, env, lC


def _write(R: _Report, data: dict) -> dict:
    result = {"data": data, "sections": R.sections,
              "extrapolations": [e.to_dict() for e in R.extrapolations],
              "skipped": R.skipped, "metrics": R.metrics}
    md = ["# Scaling-law analysis", "", f"Source: {data['source'] or 'DataFrame'}; {data['n_runs']} runs; "
          f"loss column `{data['loss_col']}` (nats/token).", ""]
    md += [f"- {n}" for n in data["notes"]]
    md += ["", f"N {data['N_range'][0]:.3g}–{data['N_range'][1]:.3g}, D {data['D_range'][0]:.3g}–"
           f"{data['D_range'][1]:.3g}, C {data['C_range'][0]:.3g}–{data['C_range'][1]:.3g}.", ""]
    for name, text in R.text:
        md += [f"## {name}", "", "```", text, "```", ""]
    if R.extrapolations:
        md += ["## Extrapolation", ""] + [f"- {e.report()}" for e in R.extrapolations] + [""]
    if R.skipped:
        md += ["## Skipped", ""] + [f"- **{k}**: {v}" for k, v in R.skipped.items()] + [""]
    md += [f"![{Path(f).stem}]({Path(f).name})" for f in R.files]
    md_path, json_path = R.out / "report.md", R.out / "report.json"
    md_path.write_text("\n".join(md) + "\n")
    files = R.files + [str(md_path), str(json_path)]
    result["files"] = files
    result = jsonable(result)
    json_path.write_text(json.dumps(result, indent=1, allow_nan=False))
    return result


def unidentified_warnings(sections: dict, skip=()) -> list[str]:
    """'<section>: <reason>' for every term a fitted section of a report does not identify."""
    return [f"{name}: {msg}" for name, sec in sections.items() if isinstance(sec, dict) and name not in skip
            for msg in sec.get("extras", {}).get("unidentified", {}).values()]


def summary(result: dict) -> str:
    """The few lines worth printing on a terminal."""
    s = result["sections"]
    lines = [f"{result['data']['n_runs']} runs from {result['data']['source'] or 'data'}"]
    if "chinchilla" in s:
        p, iv = s["chinchilla"]["params"], s["chinchilla"]["intervals"]
        lines.append("Chinchilla fit: " + ", ".join(
            f"{k} {fmt(v, '.4g')} {format_interval(iv.get(k), '.4g')}".rstrip()
            for k, v in p.items()) + f"; objective {s['chinchilla']['objective']:.5e}")
    lines += [f"WARNING {w}" for w in unidentified_warnings(s)]
    for k in ("allocation_isoflop", "allocation_envelope", "allocation_parametric"):
        if k in s:
            lines += allocation_block(k, s[k])
    if "allocation_agreement" in s:
        lines.append(agreement_line(s["allocation_agreement"]))
    for e in result["extrapolations"]:
        iv = e["interval"]
        lines.append(f"loss at {e['target']} = {fmt(e['value'])}: {fmt(e['loss'], '.4f')}"
                     + f" {format_interval(iv, '.4f')}".rstrip() + f" ({e['via']})"
                     + (f" WARNING: {e['warning']}" if e["warning"] else ""))
    if result["skipped"]:
        lines.append(f"skipped: {', '.join(result['skipped'])} (reasons in report.md)")
    lines.append(f"report: {next((f for f in result['files'] if f.endswith('report.md')), '')}")
    return "\n".join(lines)


def main(args, logger=None) -> int:
    """`scaling-suite analyze` / `python -m analysis`: load, build the report, print a summary, and
    hand report files and key numbers to `logger` (log_artifact / log_metrics / log_params) if given."""
    runs, curves, loss_col, notes, source = load_inputs(args)
    result = build_report(runs, curves, out_dir=args.out, target_N=args.target_N, target_C=args.target_C,
                          loss_col=loss_col, grid=args.grid, n_bootstrap=args.bootstrap, seed=args.seed,
                          notes=notes, make_plots=not args.no_plots, source=source)
    print(summary(result))
    if logger is not None:
        logger.log_params({"source": source, "grid": args.grid, "bootstrap": args.bootstrap,
                           "drop_highest": args.drop_highest, "target_N": args.target_N,
                           "target_C": args.target_C, "loss_col": loss_col, "n_runs": result["data"]["n_runs"]})
        logger.log_metrics({k: v for k, v in result["metrics"].items() if v is not None}, step=0)
        for f in result["files"]:
            logger.log_artifact(f, artifact_path="analysis")
    return 0
