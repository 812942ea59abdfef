"""The adaptive, time-boxed Chinchilla study: design `adaptive`, the default of quick, dev and full.

    scaling-suite sweep --mode quick                 # a 13-minute box on this machine
    scaling-suite sweep --mode quick --budget 30m --target_width 0.2

1. **Probe** this device's training speed at three sizes, with the threads each worker will have.
2. **Plan** a ladder of compute budgets that fits the box, and a validation budget beyond it
   (ladder.py: the rules and their sources). The ladder is logged (ladder.json) and reused by a
   rerun, which resumes the study instead of re-planning it.
3. **Search each budget** with Optuna, from the smallest up. Every budget is an Optuna study in the
   RDB (the GP sampler on log10 N, space.py's size dial), and every trial a nested MLflow child of
   the study's parent run, trained by worker processes (worker.py) that follow the ladder from
   budget to budget, the cores split between them. The first trials of a budget are queued around
   the optimum that the allocation law fitted on the budgets already done predicts (the prior for
   the first), so they land near it; then the GP sampler places trials, and this process watches:
   a budget whose best run is at an edge gets the next size beyond it; a budget whose minimum is
   pinned (analysis.minimum.profile_minimum: bracketed, a convex vertex, >= 4 sizes and a run
   within PIN_DECADES of the vertex) stops, so no run is trained where the minimum is already known
   not to be.
4. **Stop when the law is known**: with --target_width W the ladder ends once the 95% interval of
   a (N_opt ∝ C^a, approach 2) is narrower than W, and the summary states the time saved. The box
   itself is replanned after every budget from the measured wall times.
5. **Validate**: one run at the validation budget, at the N_opt the fitted law predicts there, with
   its loss predicted (Chinchilla's parametric fit to every run, with a bootstrap interval) and
   logged before it starts; the summary prints predicted against measured.

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
from dataclasses import dataclass, field, replace

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

from analysis import allocation
from analysis.fit import fit_chinchilla
from analysis.minimum import profile_minimum

from . import data as data_lib
from . import ladder as ladder_lib
from . import lr_auto, sweep, tracking, worker
from .config import RunConfig, make_config
from .errors import SuiteError
from .optimize import requeue_interrupted, trial_table
from .plan import MODES
from .space import Space, shape_table
from .study_report import analyze_study
from .train import train

DESIGN = "adaptive"
PIN_DECADES = 0.1          # a budget is pinned when a run lies this close to its vertex (in log10 N)
FIRST_SEEDS = (-0.6, -0.2, 0.2, 0.6)   # the first budget: only the prior to go on, so wide
SEEDS = (-0.3, 0.0, 0.3)               # later budgets: around the law's prediction
STEP_OUT = 0.3             # decades beyond an edge best for the bracketing trial
WINDOW = 0.9               # a budget's search range: its predicted optimum +- this many decades
MAX_TRIALS = 6             # per budget (the first: 7)
MIN_STEPS = 100            # fewest optimizer steps of a searched size (no warmup-dominated runs)
MAX_EPOCHS = 4.0           # Muennighoff et al. 2023 §4: up to ~4 epochs repeated data is as good as new
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


@dataclass
class Budget:
    C: float
    rows: list = field(default_factory=list)      # optimize.trial_table rows, one per configuration
    fit: dict = field(default_factory=dict)       # profile_minimum of the rows
    seconds: float = 0.0
    estimated: float = 0.0

    @property
    def N_opt(self) -> float:
        return self.fit.get("x_opt", math.nan)


def study_key(mode: str, base: RunConfig, box_seconds: float) -> str:
    blob = json.dumps([mode, DESIGN, base.to_params(), round(box_seconds)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def smallest_sensible(base: RunConfig) -> int:
    """The smallest model worth the name: two attention heads at depth 1 (ladder.py)."""
    table = shape_table(base, 2.0, 1e9 if base.head_dim >= 64 else 1e7)
    return next(s.N for s in table if s.depth == 1 and s.d_model >= 2 * base.head_dim)


def default_workers() -> int:
    """$SCALING_SUITE_WORKERS, else 2 on a CPU of >= 2 cores (two trainings at 1 thread each did 1.27x
    the work of one at 2 threads here: docs/adaptive.md), else 1 (one accelerator: one training)."""
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
    """Training FLOP/s of this device at three sizes (depth 1, 2, 4 of the base's shape), each
    measured alone with the threads one of WORKERS workers gets. Two runs at once on a shared CPU
    each go at about 0.64 of their alone-speed (2 cores: two depth-3 quick runs at 1 thread took
    65 s together against 82 s one after the other at 2 threads; docs/adaptive.md), which the plan
    assumes and the replanning after each budget corrects."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads_per_worker(workers))
    try:
        points = []
        for depth in (1, 2, 4):
            cfg = base.replace(depth=depth, C=0.0, tokens_per_param=0.0, D=float(steps * base.batch_tokens),
                               eval_every=10**6, checkpoint_every=10**6, compile="false")
            r = train(cfg, data=data, progress=False)
            points.append((cfg.derived().N, cfg.derived().C / r.wall_seconds))
    finally:
        torch.set_num_threads(before)
    return ladder_lib.Rates(tuple(points), workers, 0.64 if workers > 1 else 1.0)


# --- the law so far ----------------------------------------------------------------------------------

def law_guess(done: list[Budget], C: float, tokens_per_param: float) -> float:
    """N*(C) from the budgets done: a line in log-log through their minima (slope kept in [0.25,
    1]: two noisy budgets can give any slope), the prior's slope 1/2 through one, the prior alone
    with none."""
    pts = [(math.log10(b.C), math.log10(b.N_opt)) for b in done if b.fit.get("status") == "ok"]
    if not pts:
        pts = [(math.log10(b.C), math.log10(b.fit["best_x"])) for b in done if b.fit.get("best_x")]
    if not pts:
        return ladder_lib.prior_N(C, tokens_per_param)
    x, y = np.array(pts).T
    a = float(np.clip(np.polyfit(x, y, 1)[0], 0.25, 1.0)) if len(pts) >= 2 and np.ptp(x) > 0 else 0.5
    return float(10 ** (np.mean(y) + a * (math.log10(C) - np.mean(x))))


def allocation_so_far(done: list[Budget], n_bootstrap: int = 200):
    """analysis.allocation.isoflop (approach 2) over the runs of the budgets done, or None."""
    rows = [{"N": r["N"], "D": r["D"], "C": r["C"], "final_val_loss": r["final_val_loss"], "C_budget": b.C,
             "run_id": r["mlflow_run_id"]} for b in done for r in b.rows]
    if len({r["C_budget"] for r in rows}) < 2:
        return None
    try:
        return allocation.isoflop(pd.DataFrame(rows), loss_col="final_val_loss", n_bootstrap=n_bootstrap)
    except SuiteError:
        return None


# --- one budget --------------------------------------------------------------------------------------

def budget_space(base: RunConfig, rung: ladder_lib.Rung, center: float, D_max: float, rule: dict) -> Space:
    """The sizes budget RUNG may train: within WINDOW decades of CENTER, >= MIN_STEPS steps, D <=
    D_max, each at its lr under RULE (space.lr_from_rule)."""
    cfg = base.replace(batch_tokens=rung.batch_tokens)
    kw = dict(N_min=center / 10 ** WINDOW, N_max=center * 10 ** WINDOW, D_max=D_max, lr_rule=rule)
    try:
        return Space(cfg, rung.C, 2.0, 1.0, 1e5, MIN_STEPS, **kw)
    except SuiteError:   # fewer than 2 sizes with MIN_STEPS steps in the window: relax the steps
        return Space(cfg, rung.C, 2.0, 1.0, 1e5, MIN_STEPS // 4, **kw)


def open_budget(storage, name: str, space: Space, seeds: list[float], key: str, parent_run_id: str, tags: dict,
                max_trials: int, heartbeat: int, grace: int):
    """The budget's Optuna study (created with its seed trials queued, or loaded to resume)."""
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
    spec = worker.StudySpec.find(study)
    if spec is None:
        worker.ensure_claims(storage)
        # A queue: this process decides every run (seeds, step-outs, vertices, the GP's proposals)
        # from the results so far, and the workers train what is queued.
        spec = worker.StudySpec("queue", key, heartbeat, grace, parent_run_id, max_trials, "gp",
                                len(seeds), 0, tracking.safe_uri(tracking.tracking_uri()), space.to_spec(), tags)
        spec.save(study)
        queued: set = set()
        for x in seeds:
            s = next((s for s in space.nearest(x) if s.N not in queued), None)
            if s is not None:   # a narrow range may hold fewer sizes than seeds
                queued.add(s.N)
                enqueue(study, space, s)
    else:   # a rerun (under `mlflow run`, a new parent): the trials go to this study's parent
        spec.mlflow_parent_run_id = parent_run_id
        spec.save(study)
        requeue_interrupted(study)
    return study, spec


def enqueue(study, space: Space, s) -> None:
    cfg = space.config(s)
    d = cfg.derived()
    study.enqueue_trial({}, user_attrs={"config": cfg.to_params(), "config_key": worker.config_key(cfg), "N": d.N, "D": d.D,
                                    "C": d.C, "depth": s.depth, "aspect": s.aspect, "log10_N_trained": math.log10(d.N)})


def unique_rows(study) -> list[dict]:
    """The budget's completed trials, one per configuration (a retried copy of a trial finds its
    configuration's finished MLflow run and completes too: counted once)."""
    seen, out = set(), []
    for r in trial_table(study):
        k = (r["N"], r["D"], r["lr"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def next_step(rows: list[dict], space: Space, planned: set) -> tuple[str, float | None]:
    """What the budget needs next, from its results so far (PLANNED: sizes trained, running or queued):
    ("pinned", None): bracketed, a convex vertex, >= 4 sizes and a run within PIN_DECADES of it;
    ("step_out", log10 N): the best run is at an edge, so the next size beyond it;
    ("vertex", log10 N): the untried size nearest the parabola's vertex (a Newton step);
    ("search", None): none of these: Optuna's GP sampler proposes (gp_proposal)."""
    fit = profile_minimum([r["N"] for r in rows], [r["final_val_loss"] for r in rows], n_bootstrap=0)
    if fit["status"] == "ok" and fit["n_sizes"] >= 4 and \
            min(abs(math.log10(r["N"] / fit["x_opt"])) for r in rows) <= PIN_DECADES:
        return "pinned", None
    free = [s for s in space.shapes if s.N not in planned]
    if fit["status"] in ("unbracketed", "extrapolated") and len(rows) >= 2:
        best = min(rows, key=lambda r: r["final_val_loss"])["N"]
        up = fit["x_opt"] > best if fit["status"] == "extrapolated" else best == max(r["N"] for r in rows)
        side = 1 if up else -1
        x = math.log10(best) + side * STEP_OUT
        beyond = [s for s in free if (s.N - best) * side > 0]
        if beyond:
            return "step_out", math.log10(min(beyond, key=lambda s: abs(math.log10(s.N) - x)).N)
    if fit["status"] == "ok" and free:
        s = min(free, key=lambda s: abs(math.log10(s.N / fit["x_opt"])))
        if abs(math.log10(s.N / fit["x_opt"])) <= 1.5 * PIN_DECADES:
            return "vertex", math.log10(s.N)
    return "search", None


WHY = {"step_out": "beyond the best run, which is at an edge", "vertex": "at the parabola's vertex",
       "search": "Optuna's GP proposal"}


def gp_proposal(rows: list[dict], space: Space, planned: set, seed: int):
    """The size Optuna's GP sampler proposes next from the budget's results (a fresh in-memory
    study holding them, over log10 N on the budget's range): its nearest unplanned size, or None."""
    dist = optuna.distributions.FloatDistribution(space.lo, space.hi)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.GPSampler(seed=seed, n_startup_trials=1))
    for r in rows:
        study.add_trial(optuna.trial.create_trial(params={"log10_N": min(max(math.log10(r["N"]), space.lo), space.hi)},
                                                  distributions={"log10_N": dist}, value=r["final_val_loss"]))
    x = study.ask({"log10_N": dist}).params["log10_N"]
    # Not a near-twin of a size already planned (a running run the GP does not see): sizes within
    # 0.06 decades (15%) differ by less than the shape-to-shape scatter of the final loss here.
    far = [s for s in space.nearest(x) if all(abs(math.log10(s.N / n)) > 0.06 for n in planned if n)]
    return far[0] if far else None


def search_budget(study, space: Space, workers: int, max_trials: int, alive, say=print) -> Budget:
    """Watch budget STUDY's trials, trained by the ladder's workers, until its minimum is pinned (or
    it has its max trials); returns the budget with its rows and fit. alive(): are workers left?"""
    C = space.C
    if study.user_attrs.get("budget_done"):
        rows = unique_rows(study)
        return Budget(C, rows, _fit(rows))
    shown: set = set()
    stop = ""
    polls = 0
    while True:
        if polls % 10 == 0:   # a dead worker's trial: failed here after the grace period, then retried
            worker.fail_stale(study)
        polls += 1
        rows = unique_rows(study)
        trials = study.get_trials(deepcopy=False)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        for r in rows:
            if r["trial"] not in shown:
                shown.add(r["trial"])
                say(f"[C={C:.3g}] trial {r['trial']}: N={r['N']:,} D={r['D']:,} final_val_loss={r['final_val_loss']:.4f}")
        if not stop and waiting == 0 and running < workers:   # a worker is free: decide its next run
            planned = {t.user_attrs.get("N") for t in trials if t.state != TrialState.FAIL}
            step, x = next_step(rows, space, planned)
            if step == "pinned":
                stop = "pinned"
            elif len(rows) + running >= max_trials:
                stop = f"{max_trials} runs"
            else:
                shape = (min(space.shapes, key=lambda s: abs(math.log10(s.N) - x)) if x is not None
                         else gp_proposal(rows, space, planned, seed=len(rows)))
                if shape is None:
                    stop = "every size of the range planned"
                else:
                    enqueue(study, space, shape)
                    say(f"[C={C:.3g}] next: N={shape.N:,} ({WHY[step]})")
        if stop and running == 0 and waiting == 0:
            break
        if not alive():
            raise SuiteError(f"every worker of the study exited before budget C={C:.3g} was done (their errors are "
                             "above); rerun the same command to resume")
        time.sleep(1.0)
    rows = unique_rows(study)
    fit = _fit(rows)
    study.set_user_attr("budget_done", {"status": fit["status"], "x_opt": fit.get("x_opt")})
    return Budget(C, rows, fit)


def _fit(rows: list[dict]) -> dict:
    return profile_minimum([r["N"] for r in rows], [r["final_val_loss"] for r in rows], n_bootstrap=0)


# --- learning rates ----------------------------------------------------------------------------------

def lr_rule_for(base: RunConfig, data: data_lib.TokenData, lr: float | None) -> tuple[dict, dict]:
    """How the study sets each run's lr, as a rule the workers apply per size (space.lr_from_rule),
    and lr_info for the report. lr given: fixed. auto: a tuned law for this data and design (a
    `scaling-suite tune` run), else the preset law of these shapes (lr_auto.PRESET_LAWS), also on
    another corpus, where it was not tuned (lr_source preset_transfer: the lr optimum in N moves
    little with the text; the summary says so), else DeepSeek LLM's rule."""
    if lr is not None:
        return {"kind": "fixed", "lr": lr}, {"lr": f"{lr:g}", "lr_source": "fixed", "lr_law_run_id": "-",
                                             "lr_rule": f"fixed lr = {lr:g}"}
    key, _ = lr_auto.law_key(base, data.digest)
    run = lr_auto.find_law(tracking.init_store(), key)
    if run is not None and base.parametrization != "mup":
        m = run.data.metrics
        return ({"kind": "law", "c": m["lr_law_c"], "k": m["lr_law_k"], "B_ref": base.batch_tokens},
                {"lr": "auto", "lr_source": "law", "lr_law_run_id": run.info.run_id,
                 "lr_rule": f"lr = {m['lr_law_c']:.4g} N^-{m['lr_law_k']:.4f} (run {run.info.run_id}) x sqrt(B / "
                            f"{base.batch_tokens})"})
    exact = lr_auto.preset_law(base)
    moved = exact or lr_auto.preset_law(base.replace(dataset=lr_auto.PRESET_LAWS[0]["fields"]["dataset"]))
    if moved is not None and base.parametrization != "mup":
        c, k, B = moved["c"], moved["k"], moved["fields"]["batch_tokens"]
        source = "preset" if exact else "preset_transfer"
        where = "" if exact else f", tuned on {moved['fields']['dataset']}, not on this corpus"
        return {"kind": "law", "c": c, "k": k, "B_ref": B}, {
            "lr": "auto", "lr_source": source, "lr_law_run_id": "-",
            "lr_rule": f"the preset law lr = {c:.4g} N^-{k:.4f} at batch {B} (lr_auto.PRESET_LAWS{where}), x sqrt(B / {B}) "
                       "(Malladi et al. 2022); run `scaling-suite tune` to fit your own"}
    return {"kind": "rule"}, {"lr": "auto", "lr_source": "rule", "lr_law_run_id": "-",
                              "lr_rule": "no tuned law: lr = 0.3118 C^-0.125 (DeepSeek LLM §3.1)"}


# --- the study ---------------------------------------------------------------------------------------

def budget_name(key: str, C: float) -> str:
    return f"adaptive-{key}-C={C:.3g}"


def find_ladder(client, experiment: str | None, key: str) -> ladder_lib.Ladder | None:
    """The ladder an earlier attempt of this study planned (its parent's ladder.json), or None."""
    earlier = tracking.find_study(client, experiment, key)
    if earlier is None:
        return None
    with tracking.scratch() as tmp:
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
    lock = tracking.FileLock(tracking.lock_dir() / f"study-{key}.lock")
    if not lock.acquire(blocking=False):
        say(f"another process is running this {s.mode} study on this store; waiting for it to end")
        lock.acquire()
    try:
        ladder = find_ladder(client, s.experiment, key)
        rule, lr_info = lr_rule_for(base, data, lr)
        if ladder is None:
            rates = rates or probe(base, data, s.workers)
            say("speed here, FLOP/s per worker (%d worker(s), %d thread(s) each): %s" % (
                s.workers, threads_per_worker(s.workers), ", ".join(f"N={n:,}: {r:.3g}" for n, r in rates.points)))
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
                                  base.batch_tokens, C_REF.get(s.mode, 1e12), base.context, overhead)


C_REF = {"smoke": 3e9, "quick": 1.2e12, "dev": 1e14, "full": 1e16}   # where each mode's base batch is right


def _run(plan, ladder, base, data, s: Settings, rule, lr_info, parent, t0, say) -> sweep.StudyOutcome:
    storage = worker.open_storage(s.storage_url, s.heartbeat, s.grace)
    D_max = MAX_EPOCHS * len(data.train)
    done: list[Budget] = []
    notes: list[str] = []
    procs: list = []
    calib = 1.0          # measured / planned seconds of the budgets done
    rungs = list(ladder.rungs)
    names: list[str] = []
    prior = ladder_lib.PRIORS.get(s.mode, 20.0)
    try:
        i = 0
        while i < len(rungs):
            rung = rungs[i]
            elapsed = time.perf_counter() - t0
            est = rung.est_seconds
            left = s.box_seconds - ANALYSIS_S - elapsed - validation_seconds(ladder, 2 * rungs[-1].C, calib)
            if i >= 1 and est * calib > left:
                notes.append(f"budgets from C={rung.C:.3g} up were not trained: the box had {max(left, 0):.0f}s left "
                             f"for them, they needed about {est * calib:.0f}s")
                del rungs[i:]
                break
            center = law_guess(done, rung.C, prior) if done else rung.N_guess
            space = budget_space(base, rung, center, D_max, rule)
            offsets = FIRST_SEEDS if not done else SEEDS
            seeds = [math.log10(center) + o for o in offsets]
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
            say(f"[C={rung.C:.3g}] " + _budget_line(b))
            parent.log_metrics({"budgets_done": len(done), "runs_done": sum(len(x.rows) for x in done)}, step=len(done))
            if s.target_width and len(done) >= 3:
                al = allocation_so_far(done, s.n_bootstrap)
                if al is not None and np.all(np.isfinite(al.a_interval)) and al.a_interval[1] - al.a_interval[0] < s.target_width:
                    rest = sum(r.est_seconds for r in rungs[i + 1:]) * calib
                    notes.append(f"--target_width {s.target_width:g} reached after {len(done)} budgets: a = {al.a:.3f} "
                                 f"[{al.a_interval[0]:.3f}, {al.a_interval[1]:.3f}]; {len(rungs) - len(done)} budget(s) "
                                 f"not trained, about {rest:.0f}s saved")
                    parent.log_metrics({"target_width_seconds_saved": rest}, step=0)
                    del rungs[i + 1:]
                    break
            if i == len(rungs) - 1 and len(rungs) < ladder_lib.MAX_BUDGETS:
                # The box has room for another budget (the plan's estimates, corrected by the
                # measured times): widen the ladder, as far as the box allows.
                nxt = rungs[-1].C * ladder.ratio
                cost = rungs[-1].est_seconds * ladder.ratio
                spare = s.box_seconds - ANALYSIS_S - (time.perf_counter() - t0)
                if (cost + validation_seconds(ladder, 2 * nxt, 1.0)) * calib <= spare:
                    rungs.append(ladder_lib.Rung(nxt, ladder_lib.batch_for(nxt, base.batch_tokens, C_REF.get(s.mode, 1e12),
                                                                           base.context), law_guess(done, nxt, prior), cost))
                    notes.append(f"budget C={nxt:.3g} added: the budgets took {calib:.2f}x their planned time, so the "
                                 "box had room for it")
                    parent.log_text(json.dumps(replace(ladder, rungs=tuple(rungs)).to_dict(), indent=1), "ladder.json")
            i += 1
    finally:
        _end_ladder(storage, names, done, procs)
    ladder = replace(ladder, rungs=tuple(rungs))
    validation = validate_law(plan, ladder, base, done, data, s, rule, parent, t0, calib, say)
    wall = time.perf_counter() - t0
    outcome = sweep.StudyOutcome(parent.run_id, [], wall, lr_info=lr_info)
    outcome.children = [sweep.ChildOutcome("FINISHED", r["mlflow_run_id"], r["final_val_loss"], b.C)
                        for b in done for r in b.rows]
    facts = {"ladder": ladder.to_dict(), "budgets": [_budget_dict(b) for b in done], "notes": notes,
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


def _end_ladder(storage, names: list[str], done: list, procs: list) -> None:
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


def validate_law(plan, ladder, base, done, data, s: Settings, rule, parent, t0, calib, say) -> dict:
    """Train one run at the validation budget, at the N_opt the law fitted on the ladder predicts, its
    loss predicted and logged before it starts (module docstring, step 5)."""
    al = allocation_so_far(done, s.n_bootstrap)
    if al is None:
        return {"skipped": "fewer than 2 budgets with a bracketed minimum: no law to validate"}
    top = max(b.C for b in done)
    left = s.box_seconds - ANALYSIS_S - (time.perf_counter() - t0)
    # As far beyond the largest budget as the box allows, from 4x down to VALIDATION_MIN x.
    Cv = 4 * top
    while Cv / 1.25 >= ladder_lib.VALIDATION_MIN * top and validation_seconds(ladder, Cv, calib) > left:
        Cv /= 1.25
    if validation_seconds(ladder, Cv, calib) > left + 60:
        return {"skipped": f"the box had {max(left, 0):.0f}s left; a validation run at {Cv:.3g} FLOPs "
                           f"({Cv / top:.2g}x the largest budget) needs about {validation_seconds(ladder, Cv, calib):.0f}s"}
    N_pred = float(al.N_opt(Cv))
    rung = ladder_lib.Rung(Cv, ladder_lib.batch_for(Cv, base.batch_tokens, C_REF.get(s.mode, 1e12), base.context), N_pred)
    space = budget_space(base, rung, N_pred, MAX_EPOCHS * len(data.train), rule)
    shape = space.nearest(math.log10(N_pred))[0]
    cfg = space.config(shape)
    d = cfg.derived()
    rows = [r for b in done for r in b.rows]
    N, D, L = (np.array([r[k] for r in rows], float) for k in ("N", "D", "final_val_loss"))
    fit = fit_chinchilla(N, D, L, n_bootstrap=s.n_bootstrap)
    pred = float(fit.predict(d.N, d.D))
    iv = fit.predict_interval(np.array(d.N, float), np.array(d.D, float))
    lo, hi = (float(iv[0]), float(iv[1])) if iv is not None else (math.nan, math.nan)
    out = {"C": Cv, "factor": Cv / top, "N_opt_predicted": N_pred, "N": d.N, "D": d.D, "batch_tokens": cfg.batch_tokens,
           "predicted_loss": pred, "predicted_lo": lo, "predicted_hi": hi,
           "law": f"N_opt ∝ C^{al.a:.3f} (approach 2, {len(al.table)} budgets); loss from the Chinchilla fit "
                  f"to {len(rows)} runs{'' if fit.identified else ' (NOT IDENTIFIED)'}",
           "chinchilla_identified": bool(fit.identified)}
    parent.log_metrics({k: v for k, v in {"validation_C": Cv, "validation_N_opt_predicted": N_pred,
                                         "validation_predicted_loss": pred, "validation_predicted_lo": lo,
                                         "validation_predicted_hi": hi}.items() if math.isfinite(v)}, step=0)
    say(f"[validation] C={Cv:.3g} ({Cv / top:.2g}x the largest budget): N={d.N:,} (law: N_opt={N_pred:,.0f}), "
        f"predicted final_val_loss {pred:.4f} [{lo:.4f}, {hi:.4f}]; training it")
    tags = {"design": DESIGN, "mode": s.mode, "role": "validation", "C_budget": f"{Cv:g}",
            "predicted_loss": f"{pred:.6g}", "N_opt_predicted": f"{N_pred:.6g}"}
    child = sweep.run_child(cfg, parent.run_id, tags=tags, data=data, progress=s.progress, study_key=plan.key)
    out.update(run_id=child.run_id, status=child.status, measured_loss=child.final_val_loss)
    if child.status in ("FINISHED", "SKIPPED"):
        out["rel_error"] = child.final_val_loss / pred - 1
        parent.log_metrics({"validation_loss": child.final_val_loss, "validation_rel_error": out["rel_error"]}, step=0)
    return out


def validation_seconds(ladder, C: float, calib: float) -> float:
    """The validation run's estimated seconds at budget C: the plan's estimate per FLOP, x calib."""
    return ladder.est_validation_seconds / ladder.validation_C * C * max(calib, 0.5)


def _budget_dict(b: Budget) -> dict:
    f = b.fit
    return {"C": b.C, "runs": len(b.rows), "status": f.get("status"), "reason": f.get("reason"),
            "N_opt": f.get("x_opt"), "best_N": f.get("best_x"), "seconds": b.seconds, "estimated_seconds": b.estimated,
            "run_ids": [r["mlflow_run_id"] for r in b.rows]}


def _budget_line(b: Budget) -> str:
    f = b.fit
    where = (f"minimum at N≈{f['x_opt']:,.0f}" if f.get("status") == "ok"
             else f"no minimum located ({f.get('status')}: {f.get('reason')})")
    return f"{where} from {len(b.rows)} runs, {b.seconds:.0f}s (planned {b.estimated:.0f}s)"


def adaptive_summary(ladder, done: list[Budget], notes: list[str], validation: dict, wall: float, box: float) -> str:
    lines = [f"\n=== adaptive study: {len(done)} of {len(ladder.rungs)} planned budgets, "
             f"{sum(len(b.rows) for b in done)} runs, {wall:.0f}s of a {box:.0f}s box ==="]
    lines += [f"C={b.C:.3g}: {_budget_line(b)}" for b in done]
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
                     f"measured {v['measured_loss']:.4f}: error {v['rel_error']:+.2%}")
        lines.append(f"    prediction made before the run started, from {v['law']}")
    else:
        lines.append(f"validation: the run ended {v.get('status')}")
    return "\n".join(lines)
