"""The validation run of an adaptive study (adaptive.py, step 5): how a lab checks a law before it
spends a large budget on it.

One run at a budget beyond the largest one fitted (4x where the box and the corpus allow, down to
ladder.VALIDATION_MIN x), at the N_opt that approach 2's allocation law fitted on the ladder predicts
there. Its loss is predicted, and logged to the study's parent run, before it starts; the summary
prints predicted against measured and where the run sits relative to the predicted N_opt. The run
has role `validation` and is in no fit.
"""

from __future__ import annotations

import math

import numpy as np

from analysis.fit import fit_chinchilla, fit_kaplan, fit_loglinear, lr_law_band

from . import ladder as ladder_lib
from . import sweep
from .budget_search import Budget, allocation_so_far, budget_space
from .config import RunConfig


def validate_law(study_key: str, ladder: ladder_lib.Ladder, base: RunConfig, done: list[Budget], data, rule: dict,
                 parent, left: float, calib: float, say, mode: str, design: str, n_bootstrap: int = 200,
                 progress: bool = True) -> dict:
    """Train one run at the validation budget, at the N_opt the law fitted on the ladder's budgets
    DONE predicts, its loss predicted and logged before it starts (the module docstring). LEFT: the
    box's seconds left for it; CALIB: the budgets' measured / planned seconds; MODE, DESIGN: the
    study's, tagged on the run with its role. Returns what the summary and adaptive.json show."""
    al = allocation_so_far(done, n_bootstrap)
    if al is None:
        return {"skipped": "fewer than 2 budgets with a bracketed minimum: no law to validate"}
    ok = [b for b in done if b.fit.get("status") == "ok"]
    top = max(b.C for b in ok)   # the largest budget the law rests on
    D_max = ladder_lib.max_tokens(len(data.train))
    # As far beyond the largest budget as the box and the corpus (D_opt within MAX_EPOCHS epochs)
    # allow, from 4x down to VALIDATION_MIN x.
    Cv = 4 * top
    while Cv / 1.25 >= ladder_lib.VALIDATION_MIN * top and (ladder.validation_seconds(Cv, calib) > left
                                                             or ladder_lib.tokens_for(Cv, float(al.N_opt(Cv))) > D_max):
        Cv /= 1.25
    if ladder.validation_seconds(Cv, calib) > left + 60:
        return {"skipped": f"the box had {max(left, 0):.0f}s left; a validation run at {Cv:.3g} FLOPs "
                           f"({Cv / top:.2g}x the largest budget) needs about {ladder.validation_seconds(Cv, calib):.0f}s"}
    N_pred = float(al.N_opt(Cv))
    rung = ladder_lib.Rung(Cv, ladder_lib.batch_at(Cv, mode, base.batch_tokens, base.context), N_pred)
    # At N_opt even where that repeats the data more often (said in the summary): a run off the
    # optimum would not test the law.
    space = budget_space(base, rung, N_pred, max(D_max, 1.25 * ladder_lib.tokens_for(Cv, N_pred)), rule)
    shape = space.nearest(math.log10(N_pred))[0]
    cfg = space.config(shape)
    d = cfg.derived()
    # The prediction (made and logged before the run starts): the budgets' minimum losses as a power
    # law in C, L_opt = k C^s (Kaplan et al. 2020 eq. 1.4's form, L(C_min), without an offset), OLS in
    # log-log with its 95% band, at the validation budget. Chosen over the parametric fits at the run's
    # (N, D), also logged: in the first three studies (docs/adaptive.md, measured/predicted - 1) the
    # power law missed by +7.0%, -4.8%, +0.5%, Chinchilla's parametric fit by -8.1%, -11.6%, -9.5%.
    lc = fit_loglinear([b.C for b in ok], [b.fit["loss_opt"] for b in ok], x_name="C", y_name="loss_opt")
    band = lr_law_band(lc, Cv)   # the log-linear fit's band (named for its first use, the lr law)
    pred = float(lc.predict(Cv))
    lo, hi = (float(band[0]), float(band[1])) if band else (math.nan, math.nan)
    # Beside it, both parametric forms approach 3 chooses between (analysis/report.py), each fitted to
    # every run of the ladder, at the run's (N, D): the run tests them too.
    rows = [r for b in done for r in b.rows]
    N, D, L = (np.array([r[k] for r in rows], float) for k in ("N", "D", "final_val_loss"))
    parametric = {}
    for form, fit in (("chinchilla", fit_chinchilla(N, D, L, n_bootstrap=n_bootstrap)),
                      ("kaplan", fit_kaplan(N, D, L, n_bootstrap=n_bootstrap))):
        iv = fit.predict_interval(np.array(d.N, float), np.array(d.D, float))
        parametric[form] = {"loss": float(fit.predict(d.N, d.D)), "lo": float(iv[0]) if iv is not None else math.nan,
                            "hi": float(iv[1]) if iv is not None else math.nan, "identified": bool(fit.identified)}
    out = {"C": Cv, "factor": Cv / top, "N_opt_predicted": N_pred, "N": d.N, "D": d.D, "batch_tokens": cfg.batch_tokens,
           "predicted_loss": pred, "predicted_lo": lo, "predicted_hi": hi,
           "law": f"N_opt ∝ C^{al.a:.3f} (approach 2, {len(al.table)} budgets); loss: the {len(ok)} budgets' minima as "
                  f"L_opt ∝ C^{lc.params['s']:.3f}",
           "parametric": parametric, "n_runs_fitted": len(rows), "epochs": d.D / len(data.train)}
    parent.log_metrics({k: v for k, v in {"validation_C": Cv, "validation_N_opt_predicted": N_pred,
                                         "validation_predicted_loss": pred, "validation_predicted_lo": lo,
                                         "validation_predicted_hi": hi,
                                         **{f"validation_{f}_loss": x["loss"] for f, x in parametric.items()}}.items()
                        if math.isfinite(v)}, step=0)
    say(f"[validation] C={Cv:.3g} ({Cv / top:.2g}x the largest budget): N={d.N:,} (law: N_opt={N_pred:,.0f}), "
        f"predicted final_val_loss {pred:.4f} [{lo:.4f}, {hi:.4f}]; training it")
    tags = {"design": design, "mode": mode, "role": "validation", "C_budget": f"{Cv:g}",
            "predicted_loss": f"{pred:.6g}", "N_opt_predicted": f"{N_pred:.6g}"}
    child = sweep.run_child(cfg, parent.run_id, tags=tags, data=data, progress=progress, study_key=study_key)
    out.update(run_id=child.run_id, status=child.status, measured_loss=child.final_val_loss)
    if child.status in ("FINISHED", "SKIPPED"):
        out["rel_error"] = child.final_val_loss / pred - 1
        for x in parametric.values():
            x["rel_error"] = child.final_val_loss / x["loss"] - 1
        parent.log_metrics({"validation_loss": child.final_val_loss, "validation_rel_error": out["rel_error"],
                            **{f"validation_{f}_rel_error": x["rel_error"] for f, x in parametric.items()}}, step=0)
    return out

