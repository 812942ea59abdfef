"""Run a plan as one MLflow parent run with a nested child per configuration.

Idempotent and crash-safe: a child already FINISHED with the same params and code version is
skipped; an interrupted child (left RUNNING by a kill, or KILLED) resumes from its checkpoint
artifact; a child that fails (NaN, out of memory) is recorded FAILED with the reason and the study
goes on. Nothing finished is ever trained twice, and nothing is lost when the process dies.

WSD cooldown branching (plan.py's docstring; Hägele et al. 2024 §3.2): a trunk is an ordinary
child that also keeps checkpoints/branch_<step>.pt at its branches' cooldown starts; each branch is
a child with the same params as the independent run, tags branch_of=<trunk run id> and
branch_step=<step>, the trunk's metric history up to that step (tag history_from_trunk: the tokens
up to which the points are copied), then its own cooldown. Both kinds go through run_child, so a
kill mid-trunk or mid-branch resumes from the run's own last checkpoint, a branch killed before its
first checkpoint restarts from the trunk's (never retraining the trunk), and finished runs are
skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from . import data as data_lib
from . import earlystop, store, tracking
from .config import RunConfig
from .device import pick_device, release_memory
from .errors import SuiteError
from .plan import Plan
from .schedule import lr_per_step
from .study_report import analyze_study
from .train import Pruned, train

INTERRUPTED = ("RUNNING", "KILLED", "SCHEDULED")


@dataclass
class ChildOutcome:
    status: str                 # FINISHED (trained now), SKIPPED (finished earlier), FAILED, PRUNED
    run_id: str
    final_val_loss: float
    C: float
    wall_seconds: float = 0.0
    resumed: bool = False
    reason: str = ""
    tokens_trained: float = math.nan   # < D when pruned


def code_version() -> str:
    return tracking.git_commit()


def run_child(cfg: RunConfig, parent_run_id: str, tags: dict | None = None,
              data: data_lib.TokenData | None = None, progress: bool = True,
              resume_running: bool = True, study_key: str | None = None, bar_position: int = 0,
              save_at_steps=(), branch: tuple[str | None, int] | None = None, on_eval=None,
              reference=None) -> ChildOutcome:
    """Train CFG as a child of PARENT_RUN_ID unless an identical child already finished.

    A child matches when its params equal CFG's and its code_version tag equals this code's. It is
    looked up by study_key (so a re-run of the study under a new parent, as `mlflow run` makes,
    still finds it and adopts it) or else among PARENT_RUN_ID's children. resume_running=False
    is for distributed workers, where a RUNNING child may be alive on another machine.
    SAVE_AT_STEPS: a WSD trunk's branch steps. BRANCH: (trunk run id, step) to train CFG as a
    cooldown branch of that trunk; without the trunk's checkpoint it is trained from scratch (said).
    on_eval is train()'s hook; when it raises Pruned the run ends KILLED with tag pruned=true and
    the tokens it trained, and a later call with the same config returns it as PRUNED without training.
    REFERENCE: the study's finished runs of this schedule, for the final-loss prediction (train).
    """
    client = tracking.init_store()
    params, code = cfg.to_params(), code_version()
    # The claim: this configuration is trained by the process holding its lock, so the check for
    # an earlier run and the creation of a new one below are one step for all processes on this
    # machine, and a RUNNING run whose lock is free was left by a process that died (resume it).
    scope = {"study_key": study_key} if study_key else {"mlflow.parentRunId": parent_run_id}
    key = hashlib.sha256(json.dumps([scope, params, code], sort_keys=True).encode()).hexdigest()[:24]
    claim = store.FileLock(store.lock_dir() / f"run-{key}.lock")
    if not claim.acquire(blocking=False):
        d = cfg.derived()
        print(f"{tracking.run_name(d.N, d.D)}: another process is training this configuration; waiting for it",
              flush=True)
        claim.acquire()
    try:
        return _run_claimed(client, cfg, parent_run_id, scope, code, tags, data, progress, resume_running,
                            study_key, bar_position, save_at_steps, branch, on_eval, reference)
    finally:
        claim.release()


def _run_claimed(client, cfg, parent_run_id, scope, code, tags, data, progress, resume_running, study_key,
                 bar_position, save_at_steps, branch, on_eval, reference) -> ChildOutcome:
    params = cfg.to_params()
    same = [r for r in tracking.find_runs(client, parent_run_id, {**scope, "code_version": code})
            if r.data.params == params]
    d = cfg.derived()
    done = [r for r in same if r.info.status == "FINISHED"]
    if done:
        run = done[0]
        tracking.adopt(client, run.info.run_id, parent_run_id)
        return ChildOutcome("SKIPPED", run.info.run_id, run.data.metrics.get("final_val_loss", math.nan), d.C)
    pruned = [r for r in same if r.data.tags.get("pruned") == "true"]
    if pruned:
        run = pruned[0]
        tracking.adopt(client, run.info.run_id, parent_run_id)
        return ChildOutcome("PRUNED", run.info.run_id, math.nan, d.C, reason=run.data.tags.get("failure_reason", ""),
                            tokens_trained=run.data.metrics.get("tokens_trained", math.nan))
    failed = [r for r in same if r.info.status == "FAILED"]
    if failed:  # deterministic failures (divergence) would fail again: report, do not retrain
        run = failed[0]
        tracking.adopt(client, run.info.run_id, parent_run_id)
        return ChildOutcome("FAILED", run.info.run_id, math.nan, d.C,
                            reason=run.data.tags.get("failure_reason", "failed earlier"))

    resume_id = next((r.info.run_id for r in same if r.info.status in INTERRUPTED), None) if resume_running else None
    n_ref = len(reference) if reference is not None else 0     # the final-loss prediction it logs (earlystop.predict)
    child_tags = {"code_version": code, "study_key": study_key or "", **(tags or {}),
                  "predictor": f"study ({n_ref} runs)" if n_ref >= earlystop.MIN_REFERENCE else "own curve"}
    with store.scratch() as tmp:     # downloaded checkpoints: removed when the run ends
        ckpt = tracking.fetch_checkpoint(client, resume_id, tmp) if resume_id else None
        tracker = tracking.start_run(run_name=tracking.run_name(d.N, d.D), tags=child_tags,
                                     parent_run_id=parent_run_id, run_id=resume_id)
        if resume_id:
            tracking.adopt(client, resume_id, parent_run_id)
        branch_ckpt = None
        if branch and ckpt is None:
            branch_ckpt = start_branch(tracker, cfg, *branch, tmp)
        try:
            # The run's end status: tracker.running() (FINISHED; KILLED for a pruned trial or an
            # interruption, which a rerun of the study resumes from its last checkpoint; FAILED
            # with the reason for anything else).
            with tracker.running(stopped=(Pruned,)):
                try:
                    result = train(cfg, tracker, data=data, resume_from=ckpt, progress=progress,
                                   bar_position=bar_position, save_at_steps=save_at_steps, branch_from=branch_ckpt,
                                   on_eval=on_eval, trunk_run_id=branch[0] if branch else None,
                                   tags={"role": tags["role"]} if tags and "role" in tags else None,
                                   reference=reference)
                except Pruned as e:  # tagged, with the tokens actually trained
                    tokens = e.step * cfg.batch_tokens
                    tracker.set_tags({"pruned": "true", "pruned_at_tokens": tokens})
                    tracker.log_metrics({"tokens_trained": tokens, "flops_trained": tokens * d.flops_per_token},
                                        step=tokens)
                    raise
                if on_eval is not None:   # a tuning trial: its compute is compared with pruned ones'
                    tracker.log_metrics({"tokens_trained": d.D, "flops_trained": d.C}, step=d.D)
        except Pruned as e:
            release_memory(pick_device(cfg.device))
            return ChildOutcome("PRUNED", tracker.run_id, math.nan, d.C, reason=str(e), tokens_trained=e.step *
                                cfg.batch_tokens)
        except Exception as e:  # noqa: BLE001
            # A run that cannot go on (NaN loss, out of memory: a RuntimeError from torch, a bug)
            # is FAILED and the study goes on without this point; only an interruption (Ctrl-C,
            # SystemExit) stops the study.
            release_memory(pick_device(cfg.device))  # an OOM leaves the failed run's tensors behind
            return ChildOutcome("FAILED", tracker.run_id, math.nan, d.C,
                                reason=str(e) if isinstance(e, SuiteError) else f"{type(e).__name__}: {e}")
    return ChildOutcome("FINISHED", tracker.run_id, result.final_val_loss, d.C, result.wall_seconds,
                        resumed=ckpt is not None, tokens_trained=d.D)


# What a branch copies from its trunk (the per-step and per-evaluation histories, not the trunk's
# own final-loss predictions, which aim at the trunk's end).
TRUNK_HISTORY = ("train_loss", "lr", "tokens", "flops", "tokens_per_second", "val_loss", "val_bpb", "mem_gb")


def start_branch(tracker, cfg: RunConfig, trunk_run_id: str | None, step: int, dst_dir):
    """Tag TRACKER's run as a branch of the trunk, copy the trunk's history up to STEP once, and
    return the trunk's checkpoint at STEP (downloaded into DST_DIR); None (and a line saying so)
    when the trunk has none."""
    ckpt = tracker.fetch_branch_checkpoint(trunk_run_id, step, dst_dir) if trunk_run_id else None
    if ckpt is None:
        d = cfg.derived()
        print(f"{tracking.run_name(d.N, d.D)}: trunk {trunk_run_id} has no checkpoint at step {step}; "
              f"training it from scratch")
        tracker.set_tags({"branch_fallback": f"trunk {trunk_run_id} had no checkpoint at step {step}"})
        return None
    tokens = step * cfg.batch_tokens
    tags = tracker.client.get_run(tracker.run_id).data.tags
    if tags.get("history_from_trunk") != str(tokens):   # a restarted branch has its copy already
        tracker.copy_history(trunk_run_id, TRUNK_HISTORY, tokens)
    tracker.set_tags({"branch_of": trunk_run_id, "branch_step": str(step), "history_from_trunk": str(tokens)})
    return ckpt


@dataclass
class StudyOutcome:
    parent_run_id: str
    children: list[ChildOutcome]
    wall_seconds: float
    report: dict = field(default_factory=dict)
    lr_info: dict = field(default_factory=dict)   # lr, lr_source, lr_law_run_id (lr_auto.resolve_lr)


def open_parent(plan: Plan, experiment: str | None, params: dict) -> tracking.MlflowTracker:
    """Attach to `mlflow run`'s run, else reuse this study's earlier parent, else create one."""
    client = tracking.init_store()
    tags = {"role": "study", "study_key": plan.key, "mode": plan.mode, "design": plan.design,
            "branching": str(plan.branching).lower()}
    if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` named it at random: name it by its study
        tracker = tracking.start_run(tags={**tags, "mlflow.runName": f"{plan.mode} {plan.design} study"})
    else:
        earlier = tracking.find_study(client, experiment, plan.key)
        # A re-run of the study continues its parent, finished or not (run_study holds its lock).
        tracker = tracking.start_run(experiment, run_name=f"{plan.mode} {plan.design} study", tags=tags,
                                     run_id=earlier, reopen=True)
    tracker.log_params(params)
    return tracker


def run_study(plan: Plan, experiment: str | None = None, params: dict | None = None, progress: bool = True,
              planned_seconds: float | None = None, analyze: bool = True, n_bootstrap: int = 200,
              lr_info: dict | None = None, data: data_lib.TokenData | None = None) -> StudyOutcome:
    """lr_info: how the runs' learning rates were chosen (lr_auto.resolve_lr), logged as the parent's
    params lr, lr_source, lr_law_run_id; without it the plan's own lrs are described (fixed or not).
    data: the plan's corpus when the caller has loaded it already (else loaded here).

    One process at a time runs a given study (a lock per study key): a second sweep of the same
    study on this machine waits, then finds every run the first finished and skips it, instead of
    opening a second parent or attaching to the live one. (run_child also claims each
    configuration, for callers that train concurrently.)"""
    lock = store.FileLock(store.lock_dir() / f"study-{plan.key}.lock")
    if not lock.acquire(blocking=False):
        print(f"another process is running this {plan.mode} study on this store; waiting for it to end", flush=True)
        lock.acquire()
    try:
        return _run_study(plan, experiment, params, progress, planned_seconds, analyze, n_bootstrap, lr_info, data)
    finally:
        lock.release()


def _run_study(plan, experiment, params, progress, planned_seconds, analyze, n_bootstrap, lr_info,
               data=None) -> StudyOutcome:
    t0 = time.perf_counter()
    first = plan.points[0].config
    # The corpus is loaded (and validated: an empty corpus fails here) before any run starts.
    data = data or data_lib.load_data(first.dataset, first.tokenizer, first.vocab_size)
    lr_info = lr_info or describe_lr(plan)
    parent = open_parent(plan, experiment, {**(params or {"mode": plan.mode, "design": plan.design}),
                                            **{k: lr_info[k] for k in ("lr", "lr_source", "lr_law_run_id")}})
    parent.log_text(json.dumps(plan.describe(), indent=1), "plan.json")
    branches = plan.branches()
    saves: dict[int, list[int]] = {}
    for i, (t, s) in branches.items():
        saves.setdefault(t, []).append(s)
    # Each trunk is followed by its branches (longest first); a branch needs its trunk's checkpoints.
    order = []
    for i in range(len(plan.points)):
        if i not in branches:
            order += [i] + sorted((j for j in branches if branches[j][0] == i), key=lambda j: -branches[j][1])
    spent = plan.spent()
    total = sum(spent)
    bar = tqdm(total=total, unit="FLOP", unit_scale=True, disable=None if progress else True, position=0,
               desc=f"{plan.mode} study", dynamic_ncols=True)
    outcomes, flops_done, run_ids = [], 0.0, {}
    references: dict = {}     # schedule -> earlystop.Reference of the finished runs (the predictor's)
    # The parent's end status: tracker.running(), KILLED on an error (a rerun of the study resumes
    # it, skipping what finished), FINISHED when every run and the analysis are through.
    with parent.running(on_error="KILLED"):
        try:
            for k, i in enumerate(order):
                p = plan.points[i]
                branch = (run_ids.get(branches[i][0]), branches[i][1]) if i in branches else None
                shape = schedule_key(p.config)
                out = run_child(p.config, parent.run_id, {**p.tags, "mode": plan.mode, "role": "train"}, data=data,
                                progress=progress, study_key=plan.key, bar_position=1, save_at_steps=saves.get(i, ()),
                                branch=branch, reference=references.get(shape))
                references[shape] = add_reference(references.get(shape, earlystop.Reference()), out, p.config)
                run_ids[i] = out.run_id
                outcomes.append(out)
                bar.update(spent[i])
                flops_done += spent[i]
                bar.set_postfix(runs=f"{k + 1}/{len(plan.points)}", last=f"{out.status} {out.final_val_loss:.3f}")
                if progress:  # one line per run, also where no bar is drawn (a log, CI)
                    elapsed = time.perf_counter() - t0
                    eta = elapsed / flops_done * (total - flops_done)
                    d = p.config.derived()
                    kind = f" (branch at step {branches[i][1]})" if i in branches else ""
                    tqdm.write(f"[{k + 1}/{len(plan.points)}] {tracking.run_name(d.N, d.D)}{kind} {out.status:8s} "
                               f"final_val_loss={out.final_val_loss:.4f}  {elapsed:.0f}s elapsed, ETA {eta:.0f}s")
                parent.log_metrics({"runs_done": k + 1, "flops_done": flops_done}, step=k + 1)
        finally:
            bar.close()
        wall = time.perf_counter() - t0
        study = StudyOutcome(parent.run_id, outcomes, wall, lr_info=lr_info)
        parent.log_metrics({"wall_seconds": wall, "runs_finished": sum(o.status != "FAILED" for o in outcomes),
                            "runs_failed": sum(o.status == "FAILED" for o in outcomes),
                            "total_flops": total, **({"planned_seconds": planned_seconds} if planned_seconds else {})},
                           step=0)
        if analyze:
            try:
                study.report = analyze_study(study, plan, parent, planned_seconds, n_bootstrap)
            except Exception as e:  # noqa: BLE001 — the runs are done and kept; the analysis can be redone
                reason = f"{type(e).__name__}: {e}"
                parent.set_tags({"analysis_error": reason[:5000]})
                print(f"analysis failed ({reason}); the runs are kept: rerun it with "
                      f"`scaling-suite analyze --parent_run {parent.run_id}`")
    return study


def schedule_key(cfg: RunConfig) -> tuple:
    """What makes two runs' schedules alike in progress (tokens / D): the runs that can predict
    each other's final loss (earlystop.predict_from_study)."""
    return (cfg.schedule, cfg.cooldown_frac if cfg.schedule == "wsd" else None, cfg.warmup_max_frac)


def add_reference(ref, out: ChildOutcome, cfg: RunConfig):
    """REF with the finished child's validation curve and its lr at every step (CFG's schedule)
    added; unchanged for a run that did not finish or whose final loss is itself a prediction
    (early stop)."""
    if out.status not in ("FINISHED", "SKIPPED"):
        return ref
    client = tracking.init_store()
    entry = reference_entry(client, client.get_run(out.run_id), cfg)
    return ref.add(*entry) if entry else ref


def reference_entry(client, run, cfg: RunConfig) -> tuple | None:
    """earlystop.Reference.add's arguments for the finished MLflow RUN of configuration CFG: its
    validation curve against progress, final loss, N, D, lr at every step, peak lr and N_nonembed; None when
    its final loss is itself a prediction (early stop) or it lacks them."""
    m = run.data.metrics
    if run.data.tags.get("predicted") == "true" or not all(k in m for k in ("final_val_loss", "N", "D")):
        return None
    hist = sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda h: (h.step, h.timestamp))
    curve = {h.step: h.value for h in hist}      # MLflow step = tokens seen; a re-logged step: the later
    d = cfg.derived()
    return ([t / m["D"] for t in curve], list(curve.values()), m["final_val_loss"], m["N"], m["D"],
            lr_per_step(cfg, d), cfg.lr, d.N_nonembed)


def describe_lr(plan: Plan) -> dict:
    """lr_info for a plan whose lrs were set directly: one value (fixed) or several (per_run)."""
    lrs = sorted({p.config.lr for p in plan.points})
    if len(lrs) == 1:
        return {"lr": f"{lrs[0]:g}", "lr_source": "fixed", "lr_law_run_id": "-", "lr_rule": f"fixed lr = {lrs[0]:g}"}
    return {"lr": "per_run", "lr_source": "per_run", "lr_law_run_id": "-",
            "lr_rule": f"set per run by the caller, {lrs[0]:g}..{lrs[-1]:g}"}


def probe_rates(plan: Plan, data: data_lib.TokenData, steps: int = 12) -> dict[int, float]:
    """Measured training FLOP/s of this device for each depth in PLAN (a short run of each)."""
    rates = {}
    for depth in sorted({p.config.depth for p in plan.points}):
        cfg = next(p.config for p in plan.points if p.config.depth == depth)
        probe = cfg.replace(C=0.0, tokens_per_param=0.0, D=float(steps * cfg.batch_tokens), eval_every=10**6,
                            checkpoint_every=10**6)
        # Conservative: the loop's wall time includes the first evaluation and the first, slower
        # steps, so the plan under-promises rather than overruns.
        rates[depth] = probe.derived().C / train(probe, data=data, progress=False).wall_seconds
    return rates
