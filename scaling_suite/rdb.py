"""The Optuna RDB of the suite's studies: the storage (SQLite or PostgreSQL, with heartbeats and
retries of dead workers' trials), the study spec every worker reads, and the claims table.

No configuration is trained twice, even when two workers' samplers suggest the same size at the
same moment: a trial owns its configuration through a row in a small claims table next to
Optuna's own (primary key = study + configuration digest). An INSERT, or an UPDATE that names the
previous owner, is atomic in SQLite and PostgreSQL alike, so exactly one trial wins. The same
table hands out the allocation study's `n_trials` slots, so two workers starting the last trial
at once do not overshoot the trial count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

from . import tracking
from .config import RunConfig
from .errors import SuiteError
from .store import FileLock

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
DEFAULT_HEARTBEAT = 20     # seconds between a running trial's heartbeats
DEFAULT_GRACE = 90         # a trial silent this long is failed and retried
MAX_RETRY = 3              # retries of one trial after its worker died
ATTR = "scaling_suite"     # study user attr holding the study's spec (kind, budget, base config, ...)
CLAIMS = "scaling_suite_claims"
STORAGE_ENV = "SCALING_SUITE_STORAGE"   # the storage URL when --storage is not given


def storage_url(flag: str | None) -> str:
    """--storage, else $SCALING_SUITE_STORAGE (keeps a password off the command line), else the default."""
    return flag or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def config_key(cfg: RunConfig) -> str:
    """Digest of every setting: two trials with the same key would train the same run."""
    return hashlib.sha256(json.dumps(cfg.to_params(), sort_keys=True).encode()).hexdigest()[:20]


def trial_attrs(cfg: RunConfig) -> dict:
    """The user attrs of a trial that trains CFG: its config (what a worker trains), the claim key, and
    N, D, C and the shape (what optimize.trial_table and the samplers read)."""
    d = cfg.derived()
    return {"config": cfg.to_params(), "config_key": config_key(cfg), "N": d.N, "D": d.D, "C": d.C,
            "depth": cfg.depth, "aspect": cfg.aspect, "log10_N_trained": math.log10(d.N)}


# --- storage ---------------------------------------------------------------------------------------

def open_storage(url: str, heartbeat: int | None = DEFAULT_HEARTBEAT, grace: int | None = DEFAULT_GRACE,
                 max_retry: int = MAX_RETRY):
    """An Optuna RDBStorage with heartbeats and retry of dead workers' trials, or one clear error."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SuiteError(f"--storage {url!r} is not a database URL; use e.g. {DEFAULT_STORAGE} or "
                         "postgresql://user:password@host:5432/optuna") from None
    if heartbeat is not None and (heartbeat < 1 or grace is None or grace <= heartbeat):
        raise SuiteError(f"the heartbeat interval ({heartbeat}s) must be at least 1 s and shorter than "
                         f"the grace period ({grace}s)")
    kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:":
            try:
                os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
            except OSError as e:
                raise SuiteError(f"cannot create the folder of {url}: {e.strerror or e}") from None
        # Several processes write heartbeats and trials; wait for the lock rather than fail.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    db = parsed.database if parsed.get_backend_name() == "sqlite" else None
    # Optuna creates (or upgrades) its schema when the storage is opened; processes starting at
    # once on a fresh SQLite file crashed doing it together (3 of 4 here): one at a time.
    lock = FileLock(Path(os.path.abspath(db) + ".lock")) if db and db != ":memory:" else contextlib.nullcontext()
    with warnings.catch_warnings(), lock:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=grace if heartbeat else None,
                heartbeat_stale_trial_callback=(optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry)
                                                if heartbeat else None), **kwargs)
        except ImportError as e:   # a missing driver, or one that fails to import (ModuleNotFoundError is one)
            hint = (" (pip install 'scaling-suite[postgres]')" if parsed.get_backend_name() == "postgresql" else "")
            name = e.name or parsed.get_driver_name() or parsed.get_backend_name()
            raise SuiteError(f"the storage {tracking.safe_uri(url)} needs the Python driver {name!r}, which does not "
                             f"import{hint}") from None
        except (SQLAlchemyError, ValueError, OSError) as e:
            raise SuiteError(f"cannot open the Optuna storage {tracking.safe_uri(url)}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0]}") from None


def load_study(storage, name: str, sampler=None):
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        there = f"studies there: {', '.join(names)}" if names else "it holds no study"
        raise SuiteError(f"no study {name!r} in {tracking.safe_uri(storage.url)} ({there}); create it first with "
                         "`scaling-suite optimize ... --create_only` or enqueue_configs") from None


SPACE_FIELDS = ("C", "base", "spread", "min_tpp", "max_tpp", "min_steps", "tune", "N_min", "N_max", "D_max",
                "lr_rule")   # space.Space.to_spec()


@dataclass
class StudySpec:
    """What a scaling-suite Optuna study is: the contract between the process that creates it
    (optimize.open_search, enqueue_configs) and the workers on any machine that train its trials.
    Stored as one flat JSON dict in the study's user attr ATTR (the space's fields beside the rest,
    as studies made before this class were stored, so they still load)."""
    kind: str                              # "allocation" (optimize.py) or "queue" (enqueue_configs)
    study_key: str                         # sweep.run_child's key: one MLflow run per configuration
    heartbeat: int | None = None
    grace: int | None = None
    mlflow_parent_run_id: str | None = None
    n_trials: int | None = None            # allocation: completed trials wanted
    sampler: str = "gp"                    # allocation: space.make_sampler's name
    n_startup: int = 0
    seed: int | None = None
    tracking_uri: str | None = None        # where the MLflow runs are (password masked)
    space: dict | None = None              # allocation: space.Space.to_spec()
    tags: dict | None = None               # tags of every trial's MLflow run (an adaptive study's budget)
    next_study: str | None = None          # an adaptive ladder: the study `worker --follow` moves to ("": the end)

    def to_attrs(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "space"}
        return {**d, **(self.space or {})}

    @classmethod
    def from_attrs(cls, d: dict) -> "StudySpec":
        names = {f.name for f in dataclasses.fields(cls)} - {"space"}
        space = {k: d[k] for k in SPACE_FIELDS if k in d} or None
        return cls(**{k: v for k, v in d.items() if k in names}, space=space)

    @classmethod
    def find(cls, study) -> "StudySpec | None":
        d = study.user_attrs.get(ATTR)
        return cls.from_attrs(d) if d else None

    @classmethod
    def of(cls, study) -> "StudySpec":
        spec = cls.find(study)
        if spec is None:
            raise SuiteError(f"study {study.study_name!r} was not made by scaling-suite (no {ATTR!r} attribute)")
        return spec

    def save(self, study) -> None:
        study.set_user_attr(ATTR, self.to_attrs())


def _claims_table():
    meta = sa.MetaData()
    return sa.Table(CLAIMS, meta, sa.Column("study", sa.String(512), primary_key=True),
                    sa.Column("key", sa.String(128), primary_key=True),
                    sa.Column("trial", sa.Integer, nullable=False))


def ensure_claims(storage) -> None:
    """Create the claims table (once, in the process that creates the study)."""
    _claims_table().metadata.create_all(storage.engine)


def claim(storage, study, key: str, trial_number: int, may_take=lambda owner: False) -> int | None:
    """Make TRIAL_NUMBER the owner of KEY in STUDY. Returns None when it is, else the owner.

    may_take(owner_trial) says whether an existing owner may be replaced (a dead trial's retry);
    the replacement names the old owner in its WHERE clause, so two takers cannot both win.
    """
    t = _claims_table()
    for _ in range(5):
        try:
            with storage.engine.begin() as conn:
                conn.execute(t.insert().values(study=study.study_name, key=key, trial=trial_number))
            return None
        except IntegrityError:
            pass
        with storage.engine.begin() as conn:
            owner = conn.execute(sa.select(t.c.trial).where(t.c.study == study.study_name, t.c.key == key)).scalar()
        if owner is None:
            continue  # released in between: try the insert again
        if owner == trial_number:
            return None
        if not may_take(owner):
            return owner
        with storage.engine.begin() as conn:
            won = conn.execute(t.update().where(t.c.study == study.study_name, t.c.key == key, t.c.trial == owner)
                               .values(trial=trial_number)).rowcount
        if won == 1:
            return None
    return owner
