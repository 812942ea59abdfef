"""Workers that pull trials from one Optuna study in an RDB (rdb.py), on any number of machines.

    scaling-suite worker --storage URL --study NAME

A study is either an allocation search (optimize.py: the sampler suggests log10 N at one budget C)
or a queue of planned configurations (`enqueue_configs`: a sweep split across machines; an adaptive
study's budgets, adaptive.py). Every trial trains one configuration through `sweep.run_child`, as
a nested MLflow run of the study's parent run, so trials get the sweep's idempotence (a finished
configuration is never retrained) and resume (an interrupted child continues from its checkpoint).

Dead workers: each trial heartbeats into the storage; any worker that finds a trial silent for
longer than the grace period fails it, and `RetryHeartbeatStaleTrialCallback` queues a copy (same
params and user attrs, so the same configuration), which the next free worker resumes. Claims
(rdb.claim) keep two trials from training one configuration.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter

import optuna
from optuna.trial import TrialState

from . import data as data_lib
from . import earlystop, sweep, tracking
from .checkpoint import config_from_params
from .config import RunConfig, make_config
from .errors import SuiteError
from .rdb import (DEFAULT_GRACE, DEFAULT_HEARTBEAT, DEFAULT_STORAGE, MAX_RETRY, STORAGE_ENV, StudySpec,  # noqa: F401
                  claim, config_key, ensure_claims, load_study, open_storage, storage_url, trial_attrs)
from .space import Space, make_sampler

# A trial's "skipped" attr when every size of an allocation search is trained (optimize.wait_done
# stops waiting on it).
EXHAUSTED = "every size in the search range is already trained"


# --- the queue ---------------------------------------------------------------------------------------

def enqueue_configs(storage, study_name: str, configs: list[RunConfig], parent_run_id: str,
                    tags: list[dict] | None = None, study_key: str | None = None,
                    heartbeat: int = DEFAULT_HEARTBEAT, grace: int = DEFAULT_GRACE) -> int:
    """Queue planned configurations as trials, for workers anywhere to train. Returns how many were new.

    STORAGE is a URL or an RDBStorage. The study is created here if missing (in this one process,
    before any worker starts: concurrent creation crashes on SQLite). A configuration already in
    the study (waiting, running or done) is not queued again, so calling this twice is harmless.
    """
    if isinstance(storage, str):
        storage = open_storage(storage, heartbeat, grace)
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True)
    spec = StudySpec.find(study)
    if spec is None:
        ensure_claims(storage)
        StudySpec("queue", study_key or f"optuna:{study_name}", heartbeat, grace, parent_run_id).save(study)
    elif spec.kind != "queue":
        raise SuiteError(f"study {study_name!r} is a {spec.kind} study, not a queue; choose another name")
    known = {t.user_attrs.get("config_key") for t in study.get_trials(deepcopy=False)
             if t.state != optuna.trial.TrialState.PRUNED}
    new = 0
    for i, cfg in enumerate(configs):
        key = config_key(cfg)
        if key in known:
            continue
        known.add(key)
        d = cfg.derived()
        study.enqueue_trial({}, user_attrs={"config": cfg.to_params(), "config_key": key, "queued": True,
                                            "parent_run_id": parent_run_id, "N": d.N, "D": d.D, "C": d.C,
                                            "tags": (tags[i] if tags else {})})
        new += 1
    return new


# --- one trial ---------------------------------------------------------------------------------------

_CORPORA: dict = {}   # (dataset, tokenizer, vocab) -> TokenData: loaded once per process, for every study it works on

class Objective:
    """Trains one configuration per trial and returns its final validation loss (nats/token)."""
    def __init__(self, storage, study, parent_run_id: str, progress: bool = True):
        self.storage, self.study, self.spec = storage, study, StudySpec.of(study)
        self.parent_run_id = parent_run_id
        self.progress = progress
        self.space = Space.from_spec(self.spec.space) if self.spec.kind == "allocation" else None
        self.exhausted = False
        self.failures: list[str] = []
        self._data = _CORPORA
        self._entries: dict = {}     # study_reference's cache

    def data(self, cfg: RunConfig):
        k = (cfg.dataset, cfg.tokenizer, cfg.vocab_size)
        if k not in self._data:
            self._data[k] = data_lib.load_data(*k)
        return self._data[k]

    def _dead(self, owner: int) -> bool:
        """A claim owner that no longer trains: failed, pruned, or waiting as a queued copy."""
        t = self._trial(owner)
        return t is None or t.state in (TrialState.FAIL, TrialState.PRUNED)

    def _trial(self, number: int):
        """The study's trial NUMBER (None if it has none), through the storage's public API."""
        try:
            sid = self.storage.get_study_id_from_name(self.study.study_name)
            return self.storage.get_trial(self.storage.get_trial_id_from_study_id_trial_number(sid, number))
        except KeyError:
            return None

    def _slot(self, trial) -> bool:
        """One of the study's n_trials slots, or False: the study already has enough trials."""
        n = int(StudySpec.of(self.study).n_trials)  # re-read: a resumed search may raise it
        return any(claim(self.storage, self.study, f"slot:{i}", trial.number, self._dead) is None for i in range(n))

    def _choose(self, trial) -> RunConfig | None:
        """The configuration this trial trains: its queued one, else the free size nearest the suggestion."""
        fixed = trial.user_attrs.get("config")
        if fixed:  # queued by enqueue_configs / an initial grid point, or a dead worker's trial retried
            if self.space is not None:
                self.space.suggest(trial)  # records the queued log10_N (and lr, beta2) for the sampler's model
            cfg = make_config(**fixed)
            owner = claim(self.storage, self.study, config_key(cfg), trial.number, self._dead_or_done)
            if owner is not None:
                trial.set_user_attr("skipped", f"configuration is being trained by trial {owner}")
                return None
            return cfg
        x, extra = self.space.suggest(trial)
        for shape in self.space.nearest(x):
            cfg = self.space.config(shape, **extra)
            if claim(self.storage, self.study, config_key(cfg), trial.number) is None:
                break
        else:
            self.exhausted = True
            trial.set_user_attr("skipped", EXHAUSTED)
            return None
        for k, v in trial_attrs(cfg).items():
            trial.set_user_attr(k, v)
        return cfg

    def _dead_or_done(self, owner: int) -> bool:
        # A finished owner may be replaced too: sweep.run_child then finds its FINISHED run and skips.

        if self._dead(owner):
            return True
        return self._trial(owner).state == TrialState.COMPLETE

    def __call__(self, trial) -> float:
        if self.spec.kind == "allocation" and not self._slot(trial):
            trial.set_user_attr("skipped", "surplus: the study already has its trials")
            raise optuna.TrialPruned("surplus trial")
        if self.spec.kind == "queue" and not trial.user_attrs.get("config"):
            trial.set_user_attr("skipped", "nothing left in the queue")
            raise optuna.TrialPruned("nothing queued")
        for k in ("error", "interrupted"):  # a retried copy inherits its original's user attrs
            if trial.user_attrs.get(k):
                trial.set_user_attr(k, "")
        cfg = self._choose(trial)
        if cfg is None:
            raise optuna.TrialPruned(trial.user_attrs.get("skipped", ""))
        parent = trial.user_attrs.get("parent_run_id") or self.parent_run_id
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        # Strings: the REST store (a tracking server) refuses other tag types; SQLite converts them.
        tags = {k: str(v) for k, v in {**(self.spec.tags or {}), **trial.user_attrs.get("tags", {}),
                                        "optuna_trial": trial.number,
                                        "optuna_study": self.study.study_name, "role": "train",
                                        "search": self.spec.kind}.items()}
        try:
            out = sweep.run_child(cfg, parent, tags=tags, data=self.data(cfg), progress=self.progress,
                                  resume_running=True, study_key=self.spec.study_key,
                                  reference=study_reference(tracking.init_store(), parent, cfg, self._entries))
        except Exception as e:  # noqa: BLE001 — e.g. a store hiccup: the worker loop queues a retry
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            self.failures.append(f"{type(e).__name__}: {e}")
            raise
        except BaseException:
            # Ctrl-C / SIGTERM: Optuna marks the trial FAIL; `optimize` queues it again on restart.
            trial.set_user_attr("interrupted", True)
            raise
        trial.set_user_attr("mlflow_run_id", out.run_id)
        trial.set_user_attr("run_status", out.status)
        trial.set_user_attr("resumed", bool(out.resumed))
        if out.status == "FAILED":
            trial.set_user_attr("failure_reason", out.reason[:1000])
            self.failures.append(out.reason)
            return math.nan  # Optuna records a FAIL trial; its configuration stays claimed
        self.failures.clear()
        return float(out.final_val_loss)


def study_reference(client, parent: str, cfg: RunConfig, cache: dict) -> earlystop.Reference:
    """The study's finished training runs (PARENT's children) with CFG's schedule, other configurations
    than CFG: given to train, its final-loss prediction uses the study predictor once two have finished,
    as sweep.run_study gives its runs. CACHE (run id -> (config, Reference.add's arguments)): each
    finished run is read from MLflow once per worker."""
    ref = earlystop.Reference()
    for run in tracking.find_runs(client, parent, {"mlflow.parentRunId": parent}):
        rid = run.info.run_id
        if run.info.status != "FINISHED" or run.data.tags.get("role") != "train":
            continue
        if rid not in cache:
            try:
                other = config_from_params(run.data.params)
            except SuiteError:      # params this code cannot read (another code version)
                other = None
            cache[rid] = (other, other and sweep.reference_entry(client, run, other))
        other, entry = cache[rid]
        if entry and other != cfg and sweep.schedule_key(other) == sweep.schedule_key(cfg):
            ref = ref.add(*entry)
    return ref


# --- the loop ----------------------------------------------------------------------------------------

def fail_stale(study) -> None:
    """Fail trials whose worker went silent (their retry callback queues them again)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # since Optuna 2.9
        optuna.storages.fail_stale_trials(study)


def counts(study) -> dict[str, int]:
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def work(storage_url: str, study_name: str, heartbeat: int | None = None, grace: int | None = None,
         parent_run_id: str | None = None, max_trials: int | None = None, progress: bool = True,
         seed: int | None = None, poll: float = 2.0, storage=None, say=print) -> int:
    """Pull and train trials until the study is done. Returns how many trials this worker ran."""
    # mlflow#15713: with MLFLOW_RUN_ID set, a "child" would resume the parent. The parent id comes
    # from the study (or --parent_run_id), never from the environment.
    os.environ.pop("MLFLOW_RUN_ID", None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for h in optuna.logging.get_logger("optuna").handlers:
        h.addFilter(quiet_greenlet)
    probe = storage or open_storage(storage_url, None, None)
    spec = StudySpec.of(load_study(probe, study_name))
    if storage is None:
        storage = open_storage(storage_url, heartbeat or spec.heartbeat or DEFAULT_HEARTBEAT,
                               grace or spec.grace or DEFAULT_GRACE)
    sampler = make_sampler(spec.sampler, seed, spec.n_startup) if spec.kind == "allocation" \
        else optuna.samplers.RandomSampler()
    study = load_study(storage, study_name, sampler)
    parent = parent_run_id or spec.mlflow_parent_run_id
    client = tracking.init_store()
    try:
        client.get_run(parent)
    except Exception:  # noqa: BLE001
        raise SuiteError(f"the study's parent MLflow run {parent} is not in {tracking.tracking_uri()}; point "
                         f"MLFLOW_TRACKING_URI at the study's tracking server ({spec.tracking_uri or '?'})") from None
    objective = Objective(storage, study, parent, progress)
    ran, said_wait = 0, False
    while max_trials is None or ran < max_trials:
        fail_stale(study)
        c = counts(study)
        done, running, waiting = c[TrialState.COMPLETE.name], c[TrialState.RUNNING.name], c[TrialState.WAITING.name]
        if spec.kind == "allocation":
            n = int(StudySpec.of(study).n_trials)
            if done >= n or objective.exhausted:
                break
            busy = waiting == 0 and done + running >= n
        else:
            if waiting == 0 and running == 0:
                break
            busy = waiting == 0
        if busy:  # the rest is running elsewhere: wait, and retry it here if its worker dies
            if not said_wait and progress:
                say(f"[{study_name}] {running} trial(s) running elsewhere; waiting for them (a silent one is "
                    f"retried here after {storage.grace_period}s)")
            said_wait = True
            time.sleep(poll)
            continue
        said_wait = False
        ran_now: list = []
        try:
            study.optimize(objective, n_trials=1, gc_after_trial=False, catch=(Exception,),
                           callbacks=[lambda s, t: ran_now.append(t)])
        except ValueError as e:
            # Two processes popped the same waiting trial from SQLite at once (seen once in CI): the
            # configuration's claim made one wait for the other's run, which it then found FINISHED;
            # the other told the result first. Nothing was trained twice; go on.
            if "Cannot tell" not in str(e):
                raise
            say(f"[{study_name}] a trial was completed by another worker at the same time: {e}")
        ran += 1
        for t in ran_now:
            if progress:
                _report(say, study_name, t)
            if t.state == TrialState.FAIL and t.user_attrs.get("error"):
                # An unexpected error (not a failed training): queue the trial again, as for a
                # dead worker, at most MAX_RETRY times; its MLflow run resumes from its checkpoint.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)(study, t)
        if len(objective.failures) >= 3:
            raise SuiteError(f"3 trials in a row failed in study {study_name!r}; the last: {objective.failures[-1]}")
    return ran


def follow(storage_url: str, study_name: str, poll: float = 1.0, **kwargs) -> int:
    """Work on STUDY_NAME, then on each study its spec names as the next one (an adaptive study's
    ladder of budgets, adaptive.py), until a spec says the ladder has ended (next_study ""). While
    the current study has no next one yet, trials queued in it later are trained too (the adaptive
    study queues each run once it has seen the last results). One process for the whole ladder:
    torch, the corpus and compiled kernels are loaded once."""
    ran = 0
    probe = open_storage(storage_url, None, None)
    while study_name:
        ran += work(storage_url, study_name, **kwargs)
        while True:
            study = load_study(probe, study_name)
            nxt = StudySpec.of(study).next_study
            if nxt is not None or counts(study).get(TrialState.WAITING.name, 0):
                break
            time.sleep(poll)
        study_name = nxt if nxt is not None else study_name
    return ran


def quiet_greenlet(record: logging.LogRecord) -> bool:
    # GPSampler's note that it optimises its acquisition sequentially without `greenlet`: harmless.
    return "greenlet" not in record.getMessage()


def _report(say, study_name: str, t) -> None:
    u = t.user_attrs
    if t.state.name == "COMPLETE":
        say(f"[{study_name}] trial {t.number}: N={u.get('N', 0):,} D={u.get('D', 0):,} loss={t.value:.4f} "
            f"({u.get('run_status', '').lower()} run {u.get('mlflow_run_id', '-')})")
    else:
        say(f"[{study_name}] trial {t.number}: {t.state.name.lower()}: "
            f"{u.get('skipped') or u.get('failure_reason') or u.get('error') or ''}")


def spawn_workers(storage_url: str, study_name: str, k: int, quiet: bool = True, follow_ladder: bool = False) -> list:
    """K local worker processes, with MLFLOW_RUN_ID removed from their environment (mlflow#15713)."""
    env = {k_: v for k_, v in os.environ.items() if k_ != "MLFLOW_RUN_ID"}
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    # The URL may hold a database password: through the environment (readable by this user only,
    # /proc/<pid>/environ), never the command line, which every user sees in `ps`.
    env[STORAGE_ENV] = storage_url
    # The machine's cores split between the workers: oversubscribed OpenMP threads busy-wait, and
    # a 5-step smoke run took 5.4 s with 2 threads per worker against 0.07 s with 1 (2 cores).
    threads = max(1, (os.cpu_count() or 1) // k)
    cmd = [sys.executable, "-m", "scaling_suite.cli", "worker", "--study", study_name, "--threads", str(threads)]
    cmd += ["--follow"] if follow_ladder else []
    return [subprocess.Popen(cmd + (["--quiet"] if quiet else []), env=env) for _ in range(k)]
