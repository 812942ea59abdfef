"""Compute-optimal allocation by Optuna: at each budget C, search the model size N that minimises
the final validation loss, with D = C / flops_per_token (RunConfig(C=...) derives it).

    scaling-suite optimize --flops 1e12 3e12 1e13 --trials 12
    mlflow run . -e optimize -P flops=1e13 -P trials=12 --env-manager local

One study per budget in an RDB (default sqlite:///mlruns/optuna.db), loaded if it exists, so an
interrupted search resumes. Each trial is a nested MLflow run of the budget's search run (trial user
attr `mlflow_run_id` <-> run tag `optuna_trial`); the search run gets N_opt, D_opt and the loss at
the optimum with 95% intervals from a parabola in log N through the trials within --window decades
of the best (Hoffmann et al. 2022 §3.2, approach 2: analysis.minimum.profile_minimum, the routine
`analyze` and the study summary use, with its percentile bootstrap over trials), and a plot. Over
several budgets, N_opt ∝ C^a and D_opt ∝ C^b are fitted by analysis.allocation.isoflop on the top
run, with the same window. Trials are trained by worker.py, in this process or in
`scaling-suite worker` processes on other machines.

The search dial: a trial suggests log10 N (continuous) and trains the nearest shape of a table of
(depth, aspect) shapes, aspect within a factor `spread` of the base aspect. The depth dial alone is
too coarse (depth 1 -> 2 -> 3 is N 22k -> 35k -> 96k ... at aspect 32); letting aspect vary gives a
size every few percent. Searching log N with D derived from C is the parametrisation that found the
exact optimum of a synthetic law in 40 trials (GP and CMA-ES samplers, measured with optuna 5.0). Optionally --tune lr beta2 adds the peak
learning rate (log-uniform within 4x of the base) and beta2, since per-size tuning moves the
optimum (Porian et al. 2024 §4).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import fields

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

from analysis import allocation, plots
from analysis.minimum import profile_minimum

from . import store, tracking, worker
from .config import PRESETS, RunConfig, add_config_flags, make_config
from .errors import SuiteError
from .space import DEFAULT_SAMPLER, SAMPLERS, SEARCHED, TUNABLE, Space
from .store import scratch_dir
from .worker import DEFAULT_GRACE, DEFAULT_HEARTBEAT, DEFAULT_STORAGE, STORAGE_ENV, StudySpec, fail_stale

# --- the optimum -------------------------------------------------------------------------------------

def trial_table(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.value is not None and math.isfinite(t.value) and "N" in t.user_attrs:
            u = t.user_attrs
            rows.append({"trial": t.number, "N": u["N"], "D": u["D"], "C": u["C"], "depth": u["config"]["depth"],
                         "aspect": u["config"]["aspect"], "lr": u["config"]["lr"], "beta2": u["config"]["beta2"],
                         "final_val_loss": t.value, "mlflow_run_id": u.get("mlflow_run_id")})
    return sorted(rows, key=lambda r: r["N"])


def summarize(study, space: Space, tracker=None, window: float = 0.5) -> dict:
    """Fit the optimum of one budget's trials; log metrics, a table and a plot to the search run."""
    rows = trial_table(study)
    fit = profile_minimum([r["N"] for r in rows], [r["final_val_loss"] for r in rows], decades=window)
    out = {"C": space.C, "study": study.study_name, "n_trials": len(rows), "fit": fit, "trials": rows}
    if rows:
        # D follows from C through the FLOPs per token of the trained size nearest N_opt.
        near = min(rows, key=lambda r: abs(math.log(r["N"] / fit["x_opt"])))
        fpt_per_N = near["C"] / near["D"] / near["N"]
        D_of = lambda n: space.C / (fpt_per_N * n) if 0 < n < math.inf else math.nan  # noqa: E731
        out.update(N_opt=fit["x_opt"], D_opt=D_of(fit["x_opt"]), D_lo=D_of(fit["x_hi"]), D_hi=D_of(fit["x_lo"]))
    if tracker is not None and rows:
        names = {"x_opt": "N_opt", "x_lo": "N_lo", "x_hi": "N_hi", "best_x": "best_N"}
        m = {names.get(k, k): fit[k] for k in ("x_opt", "x_lo", "x_hi", "loss_opt", "loss_lo", "loss_hi", "best_x",
                                               "best_loss") if k in fit and math.isfinite(fit[k]) and fit[k] > 0}
        m.update({k: out[k] for k in ("D_opt", "D_lo", "D_hi") if k in out and math.isfinite(out[k])})
        if "N_opt" in out:
            m["tokens_per_param_opt"] = out["D_opt"] / out["N_opt"]
        tracker.log_metrics({**m, "trials_complete": len(rows)}, step=0)
        tracker.set_tags({"fit_status": fit["status"], "fit": f"parabola in log10 N through {fit['window']}"})
        tracker.log_text(json.dumps(out, indent=1, default=str), "optimum.json")
        path = scratch_dir() / "loss_vs_N.png"
        plots.search_trials(rows, fit, f"{study.study_name}: C = {space.C:.3g} FLOPs, {len(rows)} trials", path=path)
        tracker.log_artifact(path, "plots")
    return out


def fit_allocation(summaries: list[dict], tracker=None, window: float = 0.5) -> dict:
    """N_opt ∝ C^a and D_opt ∝ C^b over the budgets: analysis.allocation.isoflop (Hoffmann et al.
    2022 approach 2) on every budget's trials, with the window of each budget's own optimum."""
    rows = [{**{k: r[k] for k in ("N", "D", "C", "final_val_loss")}, "C_budget": s["C"]}
            for s in summaries for r in s["trials"]]
    if len({r["C_budget"] for r in rows}) < 2:
        return {}
    try:
        al = allocation.isoflop(pd.DataFrame(rows), loss_col="final_val_loss", decades=window)
    except SuiteError as e:
        return {"error": str(e)}
    out = {"a": al.a, "a_interval": list(al.a_interval), "b": al.b, "b_interval": list(al.b_interval),
           "n_budgets": len(al.table), "skipped": al.skipped}
    if tracker is not None:
        m = {"a": al.a, "b": al.b}
        for k in ("a", "b"):
            lo, hi = getattr(al, f"{k}_interval")
            if math.isfinite(lo):
                m[f"{k}_lo"], m[f"{k}_hi"] = lo, hi
        tracker.log_metrics(m, step=0)
        tracker.log_text(json.dumps(al.to_dict(), indent=1, default=str), "allocation.json")
        path = scratch_dir() / "allocation.png"
        plots.optimal_allocation([al], path=path)
        tracker.log_artifact(path, "plots")
    return out


# --- studies -----------------------------------------------------------------------------------------

def study_name(prefix: str, C: float) -> str:
    return f"{prefix}-C={C:.3g}"


def open_search(storage, name: str, space: Space, n_trials: int, sampler: str, init: int, seed: int | None,
                top_run_id: str | None, experiment: str | None, heartbeat: int, grace: int):
    """Create the study (and its MLflow search run) or load it to resume. Returns (study, search run tracker)."""
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
    spec = StudySpec.find(study)
    want = space.to_spec()
    if spec is None:
        worker.ensure_claims(storage)
        spec = StudySpec("allocation", f"optuna:{name}", heartbeat, grace, sampler=sampler, n_startup=init,
                         seed=seed, tracking_uri=tracking.safe_uri(tracking.tracking_uri()), space=want)
        for s in (space.grid(init) if sampler.startswith("grid") else []):
            cfg = space.config(s)
            d = cfg.derived()
            params = {"log10_N": math.log10(d.N), **{k: getattr(cfg, k) for k in space.tune}}
            study.enqueue_trial(params, user_attrs={**worker.trial_attrs(cfg), "grid_point": True})
    else:
        if spec.kind != "allocation":
            raise SuiteError(f"study {name!r} is a {spec.kind} study, not an allocation search; use another --study")
        diff = [k for k in want if json.dumps(want[k], sort_keys=True) != json.dumps((spec.space or {}).get(k),
                                                                                     sort_keys=True)]
        if diff:
            raise SuiteError(f"study {name!r} exists with other settings ({', '.join(diff)}); resume it with the same "
                             "settings or choose another --study")
    spec.n_trials = n_trials
    client = tracking.init_store()
    run_id = spec.mlflow_parent_run_id
    try:
        client.get_run(run_id) if run_id else None
    except Exception:  # noqa: BLE001 — the study outlived its MLflow store: start a new search run
        run_id = None
    tags = {"role": "optuna_search", "optuna_study": name, "optuna_storage": tracking.safe_uri(storage.url)}
    tracker = tracking.start_run(experiment, run_name=f"optuna {name}", tags=tags, parent_run_id=top_run_id,
                                 run_id=run_id, system_metrics=False, reopen=True)   # a resumed search
    if run_id and top_run_id:
        tracking.adopt(client, run_id, top_run_id)
    tracker.log_params({"C": space.C, "sampler": spec.sampler, "study": name, "spread": space.spread,
                        "tune": ",".join(space.tune) or "-", "N_range": f"{space.shapes[0].N}-{space.shapes[-1].N}"})
    if not run_id:
        tracker.log_text(json.dumps(space.base.to_params(), indent=1), "base_config.json")
    spec.mlflow_parent_run_id = tracker.run_id
    spec.save(study)
    requeue_interrupted(study)
    return study, tracker


def requeue_interrupted(study) -> int:
    """Queue again the trials a Ctrl-C or SIGTERM ended (heartbeats handle silent deaths)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    n = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for t in trials:
            if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
                optuna.storages.RetryHeartbeatStaleTrialCallback()(study, t)
                n += 1
    return n


def wait_done(study, poll: float = 5.0, say=print) -> None:
    """Wait for workers elsewhere to complete the study; fail (and so retry) silent trials meanwhile."""
    said = False
    while True:
        fail_stale(study)
        n = int(StudySpec.of(study).n_trials)
        trials = study.get_trials(deepcopy=False)
        if sum(t.state == TrialState.COMPLETE for t in trials) >= n or \
                any(t.user_attrs.get("skipped") == worker.EXHAUSTED for t in trials):
            return   # done, or a worker found every size trained (a search of --tune values has more)
        if not said:
            say(f"[{study.study_name}] waiting for workers to complete {n} trials")
            said = True
        time.sleep(poll)


# --- the commands ------------------------------------------------------------------------------------

def parse_numbers(values, name: str, example: str = "", positive: bool = False) -> list[float]:
    """CLI numbers given as separate words, or one MLproject string "1e12 3e12" / "1e12,3e12"."""
    out = []
    for v in values or []:
        for item in str(v).replace(",", " ").split():
            try:
                x = float(item)
            except ValueError:
                raise SuiteError(f"{name} takes numbers{' like ' + example if example else ''}, got {item!r}") from None
            if positive and not (math.isfinite(x) and x > 0):
                raise SuiteError(f"{name} must be positive, got {item!r}")
            out.append(x)
    return out


def parse_flops(values: list[str]) -> list[float]:
    """`--flops 1e12 3e12`, also `-P flops="1e12 3e12"` or "1e12,3e12" from MLproject."""
    out = parse_numbers(values, "--flops", "1e13", positive=True)
    if not out:
        raise SuiteError("give at least one budget: --flops 1e13")
    return sorted(set(out))


def base_config(args) -> RunConfig:
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig)
             if f.name != "preset" and getattr(args, f.name, None) not in (None, "")}
    fixed = sorted(set(given) & (set(SEARCHED) - {"aspect"}))
    if fixed:
        raise SuiteError(f"optimize sets {', '.join(fixed)} itself (the size per trial, D from --flops); drop --{fixed[0]}")
    base = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise SuiteError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
        base = {k: v for k, v in PRESETS[args.preset].items() if k not in SEARCHED}
        base["preset"] = args.preset
    return make_config(**{**base, **given, "C": 1e18})   # a placeholder budget; each search sets its own


def _int(value, name: str, lo: int = 1) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SuiteError(f"{name} must be a whole number, got {value!r}") from None
    if not v.is_integer() or v < lo:
        raise SuiteError(f"{name} must be a whole number >= {lo}, got {value!r}")
    return int(v)


def cmd_optimize(args) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _threads(args.threads)
    store.quiet_downloads(args.quiet)
    args.storage = worker.storage_url(args.storage)
    flops = parse_flops(args.flops)
    n_trials = _int(args.trials, "--trials")
    workers = _int(args.workers, "--workers", 0)
    init = _int(args.init, "--init", 0)
    if args.sampler not in SAMPLERS:
        raise SuiteError(f"unknown --sampler {args.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if args.sampler == "grid":
        init = n_trials
    base = base_config(args)
    spaces = [Space(base, C, args.spread, args.min_tpp, args.max_tpp, args.min_steps, tuple(args.tune or ()))
              for C in flops]  # every budget is checked before anything starts
    for space in spaces:
        # Without --tune a trial is a size, and no size is trained twice: more trials than sizes
        # would leave the study waiting for trials that can never run.
        if not space.tune and n_trials > len(space.shapes):
            raise SuiteError(f"--trials {n_trials} is more than the {len(space.shapes)} sizes that C={space.C:.3g} "
                             f"allows (N {space.shapes[0].N:,}..{space.shapes[-1].N:,}); ask for at most "
                             f"{len(space.shapes)}, or widen the range (--spread, --min_tpp, --min_steps)")
    storage = worker.open_storage(args.storage, args.heartbeat, args.grace)
    tracking.init_store()
    top = tracking.start_run(args.experiment, run_name=f"optimize C={' '.join(f'{c:.3g}' for c in flops)}",
                             tags={"role": "optimize", "optuna_storage": tracking.safe_uri(args.storage)},
                             system_metrics=False)
    summaries = []
    with top.running():
        # `mlflow run` has logged its own spelling of these (e.g. flops='1e12 3e12', quoted): keep it.
        have = tracking.init_store().get_run(top.run_id).data.params
        top.log_params({k: v for k, v in {"flops": " ".join(args.flops), "trials": args.trials,
                                          "sampler": args.sampler}.items() if k not in have})
        for space in spaces:
            name = study_name(args.study, space.C)
            study, search = open_search(storage, name, space, n_trials, args.sampler, init, args.sampler_seed,
                                        top.run_id, args.experiment, args.heartbeat, args.grace)
            print(f"[{name}] C={space.C:.3g} FLOPs: {len(space.shapes)} sizes, N {space.shapes[0].N:,}..{space.shapes[-1].N:,}; "
                  f"{n_trials} trials ({args.sampler}); MLflow search run {search.run_id}")
            if args.create_only:
                print(f"  workers: MLFLOW_TRACKING_URI={tracking.tracking_uri()} scaling-suite worker "
                      f"--storage {tracking.safe_uri(args.storage)} --study '{name}'")
                continue
            if workers == 1:
                worker.work(args.storage, name, args.heartbeat, args.grace, progress=not args.quiet,
                            seed=args.sampler_seed, storage=storage)
            elif workers > 1:
                procs = worker.spawn_workers(args.storage, name, workers, quiet=args.quiet)
                codes = [p.wait() for p in procs]
                if any(codes):
                    print(f"[{name}] {sum(1 for c in codes if c)} of {workers} workers exited with an error",
                          file=sys.stderr)
            wait_done(study)
            s = summarize(study, space, search, args.window)
            summaries.append(s)
            search.finish("FINISHED")
            _print_summary(s)
        if len(summaries) >= 2:
            alloc = fit_allocation(summaries, top, args.window)
            if alloc.get("error"):
                print(f"no allocation fit: {alloc['error']}")
            elif alloc:
                iv = lambda i: f" [{i[0]:.3f}, {i[1]:.3f}]" if math.isfinite(i[0]) else ""  # noqa: E731
                print(f"N_opt ∝ C^{alloc['a']:.3f}{iv(alloc['a_interval'])}   "
                      f"D_opt ∝ C^{alloc['b']:.3f}{iv(alloc['b_interval'])}   ({alloc['n_budgets']} budgets)")
    if args.json:
        print(json.dumps(summaries, default=str))
    return 0


def _print_summary(s: dict) -> None:
    f = s["fit"]
    if "N_opt" not in s:
        print(f"[{s['study']}] no completed trials")
        return
    iv = f" [{f['x_lo']:,.0f}, {f['x_hi']:,.0f}]" if math.isfinite(f["x_lo"]) else ""
    liv = f" [{f['loss_lo']:.4f}, {f['loss_hi']:.4f}]" if math.isfinite(f["loss_lo"]) else ""
    print(f"[{s['study']}] N_opt = {s['N_opt']:,.0f}{iv}  D_opt = {s['D_opt']:,.0f}  loss = {f['loss_opt']:.4f}{liv}  "
          f"({f['status']}{': ' + f['reason'] if f['reason'] else ''}; {f['n_points']} of {s['n_trials']} trials in the fit)")


def _threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def cmd_worker(args) -> int:
    _threads(args.threads)
    store.quiet_downloads(args.quiet)
    args.storage = worker.storage_url(args.storage)
    run = worker.follow if args.follow else worker.work
    n = run(args.storage, args.study, heartbeat=args.heartbeat, grace=args.grace, parent_run_id=args.parent_run_id,
            max_trials=_int(args.max_trials, "--max_trials") if args.max_trials else None,
            progress=not args.quiet, seed=args.sampler_seed)
    print(f"[{args.study}] worker done: ran {n} trial(s)")
    return 0


def register(sub) -> None:
    """Add `optimize` and `worker` to the CLI (called by cli.build_parser)."""
    def storage_flags(p):
        p.add_argument("--storage", default=None, help=f"Optuna RDB URL (default ${STORAGE_ENV}, else {DEFAULT_STORAGE}; "
                       f"postgresql://user:pw@host/db for many machines: put it in ${STORAGE_ENV} to keep the "
                       "password off the command line)")
        p.add_argument("--heartbeat", type=int, default=None,
                       help=f"seconds between trial heartbeats (default: the study's, {DEFAULT_HEARTBEAT})")
        p.add_argument("--grace", type=int, default=None,
                       help=f"a trial silent this long is failed and retried (default: the study's, {DEFAULT_GRACE})")
        p.add_argument("--sampler_seed", type=int, default=None, help="seed of this process's sampler")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=int, default=0,
                       help="CPU threads for torch in this process (0: torch's default, all cores). Set it when "
                            "workers share a machine: oversubscribed threads spin and ran 80x slower here")

    o = sub.add_parser("optimize", help="Optuna search of the compute-optimal model size per FLOP budget")
    o.add_argument("--flops", nargs="+", required=True, metavar="C", help="training budgets in FLOPs, e.g. 1e12 3e12 1e13")
    o.add_argument("--trials", default="12", help="completed trials per budget (default 12)")
    o.add_argument("--study", default="allocation", help="study name prefix; budget C's study is PREFIX-C=<C>")
    o.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"{', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER})")
    o.add_argument("--init", default="4", help="coarse-grid (grid+X) or random startup trials before the model (default 4)")
    o.add_argument("--tune", nargs="*", default=None, choices=TUNABLE, help="also tune these per trial")
    o.add_argument("--workers", default="1", help="local worker processes (1: this one; 0: only wait for remote workers)")
    o.add_argument("--create_only", action="store_true", help="create the studies and search runs, print the worker command")
    o.add_argument("--spread", type=float, default=2.0, help="aspect may vary within this factor of --aspect (1: depth only)")
    o.add_argument("--min_tpp", type=float, default=1.0, help="smallest D/N searched (bounds N above; default 1)")
    o.add_argument("--max_tpp", type=float, default=1e4, help="largest D/N searched (bounds N below; default 1e4)")
    o.add_argument("--min_steps", type=int, default=20, help="fewest optimizer steps a searched size may get")
    o.add_argument("--window", type=float, default=0.5, help="parabola fit: decades of N around the best trial")
    o.add_argument("--experiment", default=None, help="MLflow experiment (default: scaling-suite)")
    o.add_argument("--json", action="store_true", help="also print the summaries as JSON")
    storage_flags(o)
    add_config_flags(o)
    o.set_defaults(fn=cmd_optimize, heartbeat=DEFAULT_HEARTBEAT, grace=DEFAULT_GRACE)

    w = sub.add_parser("worker", help="train trials of an Optuna study (any number of machines)")
    w.add_argument("--study", required=True, help="the study name `optimize` printed")
    w.add_argument("--parent_run_id", default=None, help="MLflow parent run (default: the study's)")
    w.add_argument("--max_trials", default=None, help="stop after this many trials")
    w.add_argument("--follow", action="store_true",
                   help="an adaptive study's ladder: go on to each next budget's study until the ladder ends")
    storage_flags(w)
    w.set_defaults(fn=cmd_worker)
