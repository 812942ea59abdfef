"""One budget of an adaptive study (adaptive.py): where its runs go and when it stops.

The budget is an Optuna study in the RDB, of kind "queue": this process decides each run from the
results so far and the workers (worker.py) train what is queued, so every decision sees every
finished run. Its first runs are queued around the optimum that the allocation law fitted on the
budgets already done predicts (law_guess; the prior for the first budget). Then, whenever a worker
is free (next_step): beyond the best run when it is at an edge (but never beyond a run still training
there: then beside the best, short of that run); when the minimum is bracketed, at
the size nearest the parabola's vertex (analysis.minimum.profile_minimum, the routine `analyze`
uses) between the best run's neighbours, never beyond them; else (no convex vertex yet) Optuna's GP
sampler proposes (gp_proposal). The budget stops when its minimum is pinned (bracketed, a convex
vertex, >= 4 sizes and a run within PIN_DECADES of the vertex), when every size of the bracket is
tried, or at its trial limit, so no run is trained where the search already knows the minimum is not.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from analysis import allocation
from analysis.minimum import profile_minimum

from . import ladder as ladder_lib
from . import tracking, worker
from .config import RunConfig
from .errors import SuiteError
from .optimize import requeue_interrupted, trial_table
from .space import Space

PIN_DECADES = 0.1          # a budget is pinned when a run lies this close to its vertex (in log10 N)
FIRST_SEEDS = (-0.6, -0.2, 0.2, 0.6)   # the first budget: only the prior to go on, so wide
SEEDS = (-0.3, 0.0, 0.3)               # later budgets: around the law's prediction
STEP_OUT = 0.3             # decades beyond an edge best for the bracketing trial
WINDOW = 0.9               # a budget's search range: its predicted optimum +- this many decades
MIN_STEPS = 100            # fewest optimizer steps of a searched size (no warmup-dominated runs)


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
        spec = worker.StudySpec("queue", key, heartbeat, grace, parent_run_id, max_trials,
                                tracking_uri=tracking.safe_uri(tracking.tracking_uri()), space=space.to_spec(), tags=tags)
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
    study.enqueue_trial({}, user_attrs=worker.trial_attrs(space.config(s)))


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


def next_step(rows: list[dict], space: Space, planned: set, training: int = 0) -> tuple[str, float | None]:
    """What the budget needs next, from its results so far (PLANNED: sizes trained, running or queued;
    TRAINING: how many of them are training now):
    ("pinned", None): bracketed, a convex vertex, >= 4 sizes and a run within PIN_DECADES of it;
    ("step_out", log10 N): the best run is at an edge, so the next size beyond it;
    ("inside", log10 N): the best run is at an edge of the finished sizes (or the only one), a run
    beyond it still training (on both sides, for the only one): the free size between the best's
    planned neighbours nearest the best (else "wait");
    ("vertex", log10 N): bracketed: the untried size between the best run's neighbours nearest the
    parabola's vertex (a Newton step kept inside the bracket);
    ("resolved", None): bracketed by >= 4 sizes and every size between the neighbours tried;
    ("wait", None): bracketed, none free between the neighbours, one of them still training;
    ("search", None): none of these (no convex vertex yet): Optuna's GP sampler proposes (gp_proposal)."""
    fit = profile_minimum([r["N"] for r in rows], [r["final_val_loss"] for r in rows], n_bootstrap=0)
    if fit["status"] == "ok" and fit["n_sizes"] >= 4 and \
            min(abs(math.log10(r["N"] / fit["x_opt"])) for r in rows) <= PIN_DECADES:
        return "pinned", None
    free = [s for s in space.shapes if not near_twin(s.N, planned)]
    done = {r["N"] for r in rows}
    sizes = {n for n in planned if n} | done      # finished, training or queued
    best = min(rows, key=lambda r: r["final_val_loss"])["N"] if rows else None
    if fit["status"] in ("unbracketed", "extrapolated", "too_few") and rows:
        up = fit["x_opt"] > best if fit["status"] == "extrapolated" else best == max(done)
        side = 1 if up else -1
        # The sides where the minimum may lie: beyond the edge best; both, with one size finished.
        if all(any((n - best) * d > 0 for n in sizes - done) for d in ((side,) if len(done) > 1 else (1, -1))):
            # A run beyond the best is still training there: it is that side's step out. Another one
            # beyond it is far off the minimum whenever the first comes back worse (quick, 2026-12-01:
            # 48k at C=8e11, 2.03 against 1.64 at the best; 61.7k at C=1.6e12, 1.74 against 1.48; a GP
            # proposal of 151k from one finished run, 2.28), so the next run goes between the best's
            # planned neighbours, nearest the best: on the profile either way.
            below, above = neighbours(sizes, best)
            inside = [s for s in space.nearest(math.log10(best)) if s in free and below < s.N < above]
            return ("inside", math.log10(inside[0].N)) if inside else ("wait", None)
        x = math.log10(best) + side * STEP_OUT
        beyond = [s for s in free if (s.N - best) * side > 0]
        if beyond and len(rows) >= 2 and fit["status"] != "too_few":
            return "step_out", math.log10(min(beyond, key=lambda s: abs(math.log10(s.N) - x)).N)
    if fit["status"] == "ok":
        # Bracketed: the minimum lies between the best run's planned neighbours, so the next run goes
        # there, nearest the vertex. Beyond them the search already knows the minimum is not: a GP
        # proposal there (a 95k run at C=4e11 whose minimum was bracketed by 7.5k and 27k, quick
        # study 2026-12-01) trains a far, warmup-bound run that only pulls approach 3 off.
        below, above = neighbours(sizes, best)
        by_vertex = [s for s in space.nearest(math.log10(fit["x_opt"])) if s in free]
        inside = [s for s in by_vertex if below < s.N < above]
        if inside:
            return "vertex", math.log10(inside[0].N)
        if fit["n_sizes"] >= 4:
            return "resolved", None      # every size of the table inside the bracket is tried
        if training:
            return "wait", None          # a run inside the bracket is still training: its result first
        # Three sizes and none free between them: a fourth beside the bracket, on the vertex's side.
        if by_vertex:
            return "vertex", math.log10(by_vertex[0].N)
    return "search", None


def neighbours(sizes: set, N: float) -> tuple[float, float]:
    """The nearest of SIZES below and above N (0 and inf where there is none)."""
    return max((n for n in sizes if n < N), default=0), min((n for n in sizes if n > N), default=math.inf)


WHY = {"step_out": "beyond the best run, which is at an edge", "vertex": "at the parabola's vertex",
       "inside": "beside the best run, short of a run still training beyond it",
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
    # Not a near-twin of a size already planned (a running run the GP does not see).
    far = [s for s in space.nearest(x) if not near_twin(s.N, planned)]
    return far[0] if far else None


def near_twin(N: float, planned: set) -> bool:
    """Within 0.06 decades (15%) of a size already planned: sizes that close differ by less than the
    shape-to-shape scatter of the final loss here, so a second run there teaches nothing new."""
    return any(abs(math.log10(N / n)) <= 0.06 for n in planned if n)


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
            step, x = next_step(rows, space, planned, running)
            if step in ("pinned", "resolved"):
                stop = step
            elif step == "wait":
                pass
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


def budget_dict(b: Budget) -> dict:
    f = b.fit
    return {"C": b.C, "runs": len(b.rows), "status": f.get("status"), "reason": f.get("reason"),
            "N_opt": f.get("x_opt"), "best_N": f.get("best_x"), "seconds": b.seconds, "estimated_seconds": b.estimated,
            "run_ids": [r["mlflow_run_id"] for r in b.rows]}
