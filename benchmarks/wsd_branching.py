"""WSD cooldown branching vs independent runs: the same quick-size IsoFLOP study trained both ways.

    python benchmarks/wsd_branching.py --out /tmp/wsd            # quick size (about an hour on 1 core)
    python benchmarks/wsd_branching.py --out /tmp/wsd-small --scale 0.05 --bootstrap 50   # a check, minutes

Both studies are `sweep --mode quick --schedule wsd` (plan.py: 5 budgets √2 apart, depths 1-5 at
each, length-free warmups), once with `--branching true` and once with `--branching false`, each
its own study in its own experiment of the tracking store under --out (sqlite). --scale multiplies
every budget (plan.scale). Prints, for each way: the FLOPs actually spent (the runs' C_spent) and
those of the same runs trained independently, wall time, the allocation exponent a (N_opt ∝ C^a,
Hoffmann et al. 2022 approach 2) and Kaplan's alpha_N with their 95% intervals; then the ratio of
FLOPs and wall time, and whether the intervals of a and alpha_N overlap. Target (issue 6): ratio
≤ 0.6 and overlapping intervals (Hägele et al. 2024: a cooldown branch matches a run trained to
that length from scratch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_one(plan, experiment: str, bootstrap: int) -> dict:
    from scaling_suite.sweep import run_study

    t0 = time.perf_counter()
    study = run_study(plan, experiment, params={"mode": plan.mode, "design": plan.design,
                                                "branching": str(plan.branching).lower()}, n_bootstrap=bootstrap)
    wall = time.perf_counter() - t0
    rep = study.report or {}
    facts = rep.get("study", {})
    iso = rep.get("sections", {}).get("allocation_isoflop", {})
    alpha = facts.get("alpha_N", {})
    return {"experiment": experiment, "parent_run_id": study.parent_run_id, "wall_seconds": wall,
            "runs": len(study.children), "failed": sum(c.status == "FAILED" for c in study.children),
            "skipped": sum(c.status == "SKIPPED" for c in study.children),
            "compute": facts.get("compute", {}),
            "a": iso.get("a"), "a_interval": iso.get("a_interval"),
            "a_skipped": iso.get("skipped"),
            "alpha_N": alpha.get("value"), "alpha_N_interval": alpha.get("interval"),
            "alpha_N_skipped": alpha.get("skipped"), "alpha_N_identified": "unidentified" not in alpha}


def _interval(iv) -> bool:
    return bool(iv) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in iv)


def overlap(x, y) -> str:
    if not (_interval(x) and _interval(y)):
        return "n/a (an interval is missing)"
    return "yes" if max(x[0], y[0]) <= min(x[1], y[1]) else "NO"


def fmt(v, iv) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if _interval(iv) else " [no interval]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the tracking store (sqlite) and the results JSON")
    ap.add_argument("--mode", default="quick")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every compute budget (e.g. 0.05 for a check)")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits of the report's intervals")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    (out / "mlruns").mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlruns/mlflow.db"
    os.chdir(out)   # a sqlite store puts its artifacts under ./mlruns of the working directory
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.pop("MLFLOW_RUN_ID", None)

    from scaling_suite import plan as plan_lib
    from scaling_suite import tracking

    tracking.init_store()      # created once, before anything else opens it (a fresh store migrated by several processes at once crashed here)
    overrides = {"schedule": "wsd", "device": "cpu"}
    results = {}
    for branching in ("true", "false"):
        plan = plan_lib.make_plan(args.mode, None, overrides, branching)
        if args.scale != 1.0:
            plan = plan_lib.scale(plan, args.scale)
        name = "branching" if plan.branching else "independent"
        print(f"\n##### {args.mode} wsd IsoFLOP study, {name}: {len(plan.points)} runs, planned "
              f"{plan.spent_flops():.3g} FLOPs (independent: {plan.total_flops():.3g}), scale {args.scale:g}",
              flush=True)
        results[name] = run_one(plan, f"wsd-{name}-x{args.scale:g}", args.bootstrap)
        (out / "wsd_branching.json").write_text(json.dumps(results, indent=1, default=str))

    b, i = results["branching"], results["independent"]
    lines = [f"\n===== WSD branching vs independent runs: {args.mode} wsd IsoFLOP study, scale {args.scale:g}, "
             f"bootstrap {args.bootstrap} =====",
             f"{'':14s}{'runs':>6s}{'FLOPs spent':>14s}{'FLOPs indep.':>14s}{'wall s':>9s}   a (N_opt ∝ C^a)"
             f"{'':12s}alpha_N (Kaplan, N_nonembed)"]
    for name, r in (("branching", b), ("independent", i)):
        c = r["compute"]
        lines.append(f"{name:14s}{r['runs']:>6d}{c.get('C_spent', float('nan')):>14.4g}"
                     f"{c.get('C_independent', float('nan')):>14.4g}{r['wall_seconds']:>9.0f}   "
                     f"{fmt(r['a'], r['a_interval']):28s}{fmt(r['alpha_N'], r['alpha_N_interval'])}"
                     + ("" if r["alpha_N_identified"] else "  NOT IDENTIFIED (analysis/fit.py term_support)"))
        if r["failed"] or r["skipped"]:
            lines.append(f"{'':14s}({r['failed']} failed, {r['skipped']} reused from an earlier attempt)")
        if r["a_skipped"]:
            lines.append(f"{'':14s}IsoFLOP budgets skipped: {r['a_skipped']}")
    spent = b["compute"].get("C_spent", float("nan")) / i["compute"].get("C_spent", float("nan"))
    lines += [f"FLOPs ratio (branching spent / independent spent): {spent:.3f}  (target ≤ 0.6)",
              f"wall-time ratio: {b['wall_seconds'] / i['wall_seconds']:.3f}",
              f"a intervals overlap: {overlap(b['a_interval'], i['a_interval'])}; "
              f"alpha_N intervals overlap: {overlap(b['alpha_N_interval'], i['alpha_N_interval'])}",
              f"store: {os.environ['MLFLOW_TRACKING_URI']}; studies {b['parent_run_id']} (branching), "
              f"{i['parent_run_id']} (independent)"]
    print("\n".join(lines), flush=True)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
