"""The adaptive, time-boxed Chinchilla study: design `adaptive`, the default of quick, dev and full.

    scaling-suite sweep --mode quick                 # a 13-minute box on this machine
    scaling-suite sweep --mode quick --budget 30m --target_width 0.2

1. **Probe** this device's training speed at three sizes, with the threads each worker will have.
2. **Plan** a ladder of compute budgets that fits the box, and a validation budget beyond it
   (ladder.py: the rules and their sources). The ladder is logged (ladder.json) and reused by a
   rerun, which resumes the study instead of re-planning it.
3. **Search each budget** with Optuna, from the smallest up: one Optuna study per budget in the RDB,
   every trial a nested MLflow child of the study's parent, trained by worker processes (worker.py)
   that follow the ladder, the cores split between them. A budget's first trials are queued around
   the optimum that the law fitted on the budgets done predicts (the prior for the first); then
   budget_search.next_step places each run (beyond an edge best, at the vertex, else the GP's
   proposal), and a budget stops once its minimum is pinned (analysis.minimum.profile_minimum).
4. **Stop when the law is known**: with --target_width W the ladder ends once approach 2's 95%
   interval on a is narrower than W. After every budget the box is replanned from the measured
   wall times (budgets dropped, or one added where the box and the corpus allow).
5. **Validate** (validation.py): one run at the validation budget, at the N_opt the law predicts
   there, its loss predicted (the budgets' minima as a power law in C; Chinchilla's fit beside it)
   and logged before it starts; the summary prints predicted against measured.

A killed study resumes: the same command finds its parent run and ladder, each budget's Optuna
study (finished budgets are skipped, a dead worker's trial is retried after the grace period and
its MLflow run resumed from its checkpoint), and the validation run if it had started.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import optuna
import torch

from . import data as data_lib
from . import ladder as ladder_lib
from . import lr_auto, store, sweep, tracking, worker
from .config import RunConfig, make_config
from .errors import SuiteError
from .budget_search import (FIRST_SEEDS, SEEDS, Budget, allocation_so_far, budget_dict, budget_space, law_guess,
                            open_budget, search_budget)
from .plan import MODES
from .space import shape_table
from .study_report import adaptive_summary, analyze_study, budget_line
from .train import train
from .validation import validate_law

DESIGN = "adaptive"
MAX_TRIALS = 6             # per budget (the first: 7)
ANALYSIS_S = 60.0          # the analysis at the end, and the set-up before the probe
WORKERS_ENV = "SCALING_SUITE_WORKERS"


@dataclass
class AdaptivePlan:
    """What open_parent and the study report need to know of an adaptive study."""
    mode: str
    key: str
    base: RunConfig
    design: str = DESIGN
    branching: bool = False
    points: tuple = ()
    ladder: ladder_lib.Ladder | None = None


def study_key(mode: str, base: RunConfig, box_seconds: float) -> str:
    blob = json.dumps([mode, DESIGN, base.to_params(), round(box_seconds)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def smallest_sensible(base: RunConfig) -> int:
    """The smallest model worth the name: two attention heads at depth 1 (ladder.py)."""
    table = shape_table(base, 2.0, 1e9 if base.head_dim >= 64 else 1e7)
    return next(s.N for s in table if s.depth == 1 and s.d_model >= 2 * base.head_dim)


def default_workers() -> int:
    """$SCALING_SUITE_WORKERS, else 2 on a CPU of >= 2 cores (two trainings at 1 thread each did 1.27x
    the work of one at 2 threads on the reference 2-core CPU), else 1 (one accelerator: one training)."""
    if os.environ.get(WORKERS_ENV):
        return int(os.environ[WORKERS_ENV])
    return 2 if not torch.cuda.is_available() and not torch.backends.mps.is_available() and (os.cpu_count() or 1) >= 2 \
        else 1


def base_config(mode: str, overrides: dict) -> RunConfig:
    """The mode's run settings with the user's (size and budget are the search's)."""
    return make_config(**{**MODES[mode]["base"], **overrides}, depth=1, C=1e12)


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def probe(base: RunConfig, data: data_lib.TokenData, workers: int, steps: int = 12) -> ladder_lib.Rates:
    """Training FLOP/s of this device at three sizes (depth 1, 2, 4 of the base's shape), each alone
    with the threads one of WORKERS workers gets. Two runs at once on a shared CPU each go at about
    0.64 of that (2 cores: two depth-3 quick runs at 1 thread took 65 s together against 82 s one after
    the other at 2 threads), which the replanning after each budget corrects. Depth 2 is also timed on
    every core, as the validation run trains (1.8x one thread here; without it the box went unused)."""
    before = torch.get_num_threads()

    def rate(depth: int, threads: int) -> tuple[int, float]:
        torch.set_num_threads(threads)
        cfg = base.replace(depth=depth, C=0.0, tokens_per_param=0.0, D=float(steps * base.batch_tokens),
                           eval_every=10**6, checkpoint_every=10**6, compile="false")
        return cfg.derived().N, cfg.derived().C / train(cfg, data=data, progress=False).wall_seconds

    try:
        points = [rate(depth, threads_per_worker(workers)) for depth in (1, 2, 4)]
        speedup = rate(2, before)[1] / points[1][1] if before > threads_per_worker(workers) else 1.0
    finally:
        torch.set_num_threads(before)
    return ladder_lib.Rates(tuple(points), workers, 0.64 if workers > 1 else 1.0, max(1.0, speedup))


# --- the study ---------------------------------------------------------------------------------------

def budget_name(key: str, C: float) -> str:
    return f"adaptive-{key}-C={C:.3g}"


def find_ladder(client, experiment: str | None, key: str) -> ladder_lib.Ladder | None:
    """The ladder an earlier attempt of this study planned (its parent's ladder.json), or None."""
    earlier = tracking.find_study(client, experiment, key)
    if earlier is None:
        return None
    with store.scratch() as tmp:
        try:
            path = client.download_artifacts(earlier, "ladder.json", str(tmp))
        except Exception:  # noqa: BLE001 — killed before it logged its plan: plan again
            return None
        return ladder_lib.Ladder.from_dict(json.loads(open(path).read()))


@dataclass
class Settings:
    mode: str
    box_seconds: float
    workers: int
    target_width: float | None = None
    storage_url: str = worker.DEFAULT_STORAGE
    heartbeat: int = worker.DEFAULT_HEARTBEAT
    grace: int = worker.DEFAULT_GRACE
    experiment: str | None = None
    progress: bool = True
    n_bootstrap: int = 200
    analyze: bool = True


def run_adaptive(base: RunConfig, data: data_lib.TokenData, s: Settings, lr: float | None = None, params: dict | None = None,
                 rates: ladder_lib.Rates | None = None, say=print) -> sweep.StudyOutcome:
    """Plan, search, validate and analyze one adaptive study (the module docstring). RATES: this
    device's speed when already measured (else probed here)."""
    t0 = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for h in optuna.logging.get_logger("optuna").handlers:
        h.addFilter(worker.quiet_greenlet)
    key = study_key(s.mode, base, s.box_seconds)
    client = tracking.init_store()
    plan = AdaptivePlan(s.mode, key, base)
    lock = store.FileLock(store.lock_dir() / f"study-{key}.lock")
    if not lock.acquire(blocking=False):
        say(f"another process is running this {s.mode} study on this store; waiting for it to end")
        lock.acquire()
    try:
        ladder = find_ladder(client, s.experiment, key)
        rule, lr_info = lr_auto.rule_for(base, data, lr)
        if ladder is None:
            rates = rates or probe(base, data, s.workers)
            say("speed here, FLOP/s per worker (%d worker(s), %d thread(s) each): %s; alone on every core %.2gx" % (
                s.workers, threads_per_worker(s.workers), ", ".join(f"N={n:,}: {r:.3g}" for n, r in rates.points),
                rates.alone_speedup))
            ladder = plan_for(base, data, s, rates, overhead=ANALYSIS_S + ladder_lib.WORKER_START_S + (time.perf_counter() - t0))
        plan.ladder = ladder
        say(f"plan: {ladder.describe()}")
        say(f"learning rates: {lr_info['lr_source']}: {lr_info['lr_rule']}")
        # params as asked (design "auto" under `mlflow run`); the parent's tags say design=adaptive.
        parent = sweep.open_parent(plan, s.experiment, {"mode": s.mode, "design": DESIGN, **(params or {}),
                                                        **{k: lr_info[k] for k in ("lr", "lr_source", "lr_law_run_id")}})
        parent.log_text(json.dumps(ladder.to_dict(), indent=1), "ladder.json")
        with parent.running(on_error="KILLED"):
            outcome = _run(plan, ladder, base, data, s, rule, lr_info, parent, t0, say)
    finally:
        lock.release()
    return outcome


def plan_for(base: RunConfig, data, s: Settings, rates: ladder_lib.Rates, overhead: float) -> ladder_lib.Ladder:
    """ladder.plan_ladder with this mode's prior and base, the corpus' epoch limit left to the search."""
    return ladder_lib.plan_ladder(s.box_seconds, rates, ladder_lib.PRIORS.get(s.mode, 20.0), smallest_sensible(base),
                                  base.batch_tokens, ladder_lib.C_REF.get(s.mode, 1e12), base.context, overhead)


def _run(plan, ladder, base, data, s: Settings, rule, lr_info, parent, t0, say) -> sweep.StudyOutcome:
    storage = worker.open_storage(s.storage_url, s.heartbeat, s.grace)
    D_max = ladder_lib.max_tokens(len(data.train))
    done: list[Budget] = []
    notes, procs, names = [], [], []
    calib = 1.0          # measured / planned seconds of the budgets done
    rungs = list(ladder.rungs)
    prior = ladder_lib.PRIORS.get(s.mode, 20.0)
    try:
        i = 0
        while i < len(rungs):
            rung = rungs[i]
            est = rung.est_seconds
            stop = _dropped(rungs, i, ladder, done, base, s, t0, calib, notes, parent, D_max)
            if stop == "box":
                break
            if stop:
                continue
            center = law_guess(done, rung.C, prior) if done else rung.N_guess
            space = budget_space(base, rung, center, D_max, rule)
            seeds = [math.log10(center) + o for o in (SEEDS if done else FIRST_SEEDS)]
            tags = {"design": DESIGN, "C_budget": f"{rung.C:g}", "mode": s.mode, "batch_rule": "C^0.3271 (DeepSeek LLM §3.1)"}
            names.append(budget_name(plan.key, rung.C))
            study, spec = open_budget(storage, names[i], space, seeds, plan.key, parent.run_id, tags,
                                      MAX_TRIALS + (0 if done else 1), s.heartbeat, s.grace)
            if i > 0:   # the workers move on from the previous budget to this one
                prev = worker.load_study(storage, names[i - 1])
                pspec = worker.StudySpec.of(prev)
                pspec.next_study = names[i]
                pspec.save(prev)
            if not procs:
                procs = worker.spawn_workers(s.storage_url, names[i], s.workers, quiet=True, follow_ladder=True)
            say(f"[C={rung.C:.3g}] budget {i + 1}/{len(rungs)}: batch {rung.batch_tokens:,} tokens, sizes "
                f"{space.shapes[0].N:,}..{space.shapes[-1].N:,}, first runs at N≈{center:,.0f}")
            t_b = time.perf_counter()
            b = search_budget(study, space, s.workers, spec.n_trials, lambda: any(p.poll() is None for p in procs), say)
            b.seconds, b.estimated = time.perf_counter() - t_b, est
            client = tracking.init_store()
            for r in b.rows:   # a resumed study's earlier runs, under this attempt's parent (`mlflow run` makes one each time)
                tracking.adopt(client, r["mlflow_run_id"], parent.run_id)
            done.append(b)
            calib = sum(x.seconds for x in done) / max(1e-9, sum(x.estimated for x in done))
            say(f"[C={rung.C:.3g}] " + budget_line(b))
            parent.log_metrics({"budgets_done": len(done), "runs_done": sum(len(x.rows) for x in done)}, step=len(done))
            if s.target_width and len(done) >= 3 and target_reached(done, rungs, i, s, calib, notes, parent):
                del rungs[i + 1:]
                break
            if i == len(rungs) - 1:
                widen(rungs, ladder, done, base, s, t0, calib, notes, parent, D_max)
            i += 1
    finally:
        _end_ladder(storage, names, procs)
    ladder = replace(ladder, rungs=tuple(rungs))
    validation = validate_law(plan.key, ladder, base, done, data, rule, parent, s.box_seconds - ANALYSIS_S - (
        time.perf_counter() - t0), calib, say, s.mode, DESIGN, n_bootstrap=s.n_bootstrap, progress=s.progress)
    wall = time.perf_counter() - t0
    outcome = sweep.StudyOutcome(parent.run_id, [], wall, lr_info=lr_info)
    outcome.children = [sweep.ChildOutcome("FINISHED", r["mlflow_run_id"], r["final_val_loss"], b.C)
                        for b in done for r in b.rows]
    facts = {"ladder": ladder.to_dict(), "budgets": [budget_dict(b) for b in done], "notes": notes,
             "validation": validation}
    parent.log_text(json.dumps(facts, indent=1, default=str), "adaptive.json")
    parent.log_metrics({"wall_seconds": wall, "runs_finished": len(outcome.children), "box_seconds": s.box_seconds},
                       step=0)
    if s.analyze:
        try:
            outcome.report = analyze_study(outcome, plan, parent, s.box_seconds, s.n_bootstrap)
        except Exception as e:  # noqa: BLE001 — the runs are kept; the analysis can be redone
            parent.set_tags({"analysis_error": f"{type(e).__name__}: {e}"[:5000]})
            say(f"analysis failed ({type(e).__name__}: {e}); rerun it with `scaling-suite analyze --parent_run "
                f"{parent.run_id}`")
    text = adaptive_summary(ladder, done, notes, validation, wall, s.box_seconds)
    parent.log_text(text, "analysis/adaptive_summary.txt")
    say(text)
    return outcome


def target_reached(done, rungs, i, s: Settings, calib: float, notes: list, parent) -> bool:
    """--target_width: approach 2's 95% interval on a, from >= MIN_BUDGETS budgets, narrower? (In NOTES.)"""
    al = allocation_so_far(done, s.n_bootstrap) if len(done) >= ladder_lib.MIN_BUDGETS else None
    if al is None or not np.all(np.isfinite(al.a_interval)) or al.a_interval[1] - al.a_interval[0] >= s.target_width:
        return False
    rest = sum(r.est_seconds for r in rungs[i + 1:]) * calib
    notes.append(f"--target_width {s.target_width:g} reached after {len(done)} budgets: a = {al.a:.3f} "
                 f"[{al.a_interval[0]:.3f}, {al.a_interval[1]:.3f}]; {len(rungs) - len(done)} budget(s) "
                 f"not trained, about {rest:.0f}s saved")
    parent.log_metrics({"target_width_seconds_saved": rest}, step=0)
    return True


def widen(rungs: list, ladder, done, base, s: Settings, t0: float, calib: float, notes: list, parent, D_max) -> None:
    """Append a budget where the box (the plan's estimates x the measured pace) and the corpus (a size
    at half its optimum within ladder.MAX_EPOCHS epochs) have room for it: above the ladder while it
    has fewer than MAX_BUDGETS; else, or where that one does not fit, between two of its budgets
    (ladder.fill_gap), up to MAX_FILLED. What does not fit is said once in NOTES."""
    top = max(rungs, key=lambda r: r.C)
    spare = s.box_seconds - ANALYSIS_S - (time.perf_counter() - t0)
    options = []     # (C, estimated seconds, the validation budget it implies, where)
    if len(rungs) < ladder_lib.MAX_BUDGETS:
        options.append((top.C * ladder.ratio, top.est_seconds * ladder.ratio, 2 * ladder.ratio * top.C, ""))
    gap = ladder_lib.fill_gap(rungs, ladder.ratio) if len(rungs) < ladder_lib.MAX_FILLED else None
    if gap:
        a, b = gap
        options.append((math.sqrt(a.C * b.C), math.sqrt(a.est_seconds * b.est_seconds), 2 * top.C,
                        f" between C={a.C:.3g} and C={b.C:.3g}"))
    for C, cost, Cv, where in options:
        need = (cost + ladder.validation_seconds(Cv, 1.0)) * calib    # at the measured pace
        why = (f"with its validation it needs ~{need:.0f}s, {spare:.0f}s left" if need > spare else
               corpus_bars(C, done, s.mode, D_max))
        if why:
            # Once: widen runs after every budget, and _dropped may have said it of a planned budget.
            if not any(f"C={C:.3g}" in n.split(":")[0] for n in notes):
                notes.append(f"budget C={C:.3g}{where} not added: {why}")
            continue
        guess = law_guess(done, C, ladder_lib.PRIORS.get(s.mode, 20.0))
        rungs.append(ladder_lib.Rung(C, ladder_lib.batch_at(C, s.mode, base.batch_tokens, base.context), guess, cost))
        notes.append(f"budget C={C:.3g} added{where}: the budgets took {calib:.2f}x their planned time, so the box had room")
        parent.log_text(json.dumps(replace(ladder, rungs=tuple(rungs)).to_dict(), indent=1), "ladder.json")
        return


def _dropped(rungs, i, ladder, done, base, s: Settings, t0, calib, notes, parent, D_max) -> str:
    """Whether budget RUNGS[i] is dropped before it starts, with the budgets above it (said in NOTES):
    "box" when the box has no room left for it; "corpus" when the corpus cannot feed it (the plan
    knew the device's speed only), and then widen may put a budget between others instead; "" when
    it is trained."""
    rung = rungs[i]
    left = (s.box_seconds - ANALYSIS_S - (time.perf_counter() - t0)
            - ladder.validation_seconds(2 * max(r.C for r in rungs), calib))
    if i >= 1 and rung.est_seconds * calib > left:
        why, stop = f"the box had {max(left, 0):.0f}s left for them, they needed about {rung.est_seconds * calib:.0f}s", "box"
    elif done and (why := corpus_bars(rung.C, done, s.mode, D_max)):
        stop = "corpus"
    else:
        return ""
    notes.append(f"budgets from C={rung.C:.3g} up were not trained: {why}")
    del rungs[i:]
    if stop == "corpus":
        widen(rungs, ladder, done, base, s, t0, calib, notes, parent, D_max)
    return stop


def corpus_bars(C: float, done, mode: str, D_max: float) -> str:
    """Why the corpus cannot feed budget C ("" if it can): a size at half its predicted optimum (the
    bracket's lower side) would repeat the training split more than MAX_EPOCHS times."""
    guess = law_guess(done, C, ladder_lib.PRIORS.get(mode, 20.0))
    below = ladder_lib.tokens_for(C, guess / 2)
    return (f"a size below its optimum (N≈{guess:,.0f}) needs about {below:.3g} tokens, more than "
            f"{ladder_lib.MAX_EPOCHS:g} epochs of this corpus (Muennighoff et al. 2023)" if below > D_max else "")


def _end_ladder(storage, names: list[str], procs: list) -> None:
    """Tell the workers the ladder has ended (every opened budget without a next one), let them
    finish, and stop any that do not within a minute (an error here: their trials are retried on a rerun)."""
    for name in names:
        try:
            st = worker.load_study(storage, name)
        except SuiteError:
            continue
        spec = worker.StudySpec.of(st)
        if spec.next_study is None:
            spec.next_study = ""
            spec.save(st)
    deadline = time.time() + 60
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except Exception:  # noqa: BLE001 — subprocess.TimeoutExpired: a worker still training
            p.terminate()
            p.wait()
