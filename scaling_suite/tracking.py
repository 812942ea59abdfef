"""The only writer to MLflow. Everything else logs through a Tracker; tests use NullTracker.

Design (torchtitan's metric logger, nanochat's dummy wandb): a small interface with a null
implementation. MlflowTracker talks to MLflow through MlflowClient with explicit run ids (never
the fluent active-run stack), so nested runs, workers and `mlflow run` compose without surprises
(see mlflow#15713: with MLFLOW_RUN_ID set, start_run(parent_run_id=...) resumes the parent).

Metrics are buffered and sent with log_batch: one call per point costs 3 ms on SQLite and 54 ms
over HTTP (measured with mlflow 3.17.2). The MLflow ``step`` of every metric is the number of tokens seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

# mlflow is imported inside the functions that use it (a deliberately lazy heavy library: `import
# mlflow` alone takes ~3.5 s here), so the NullTracker, `--help` and the analysis of a CSV never pay it.
from .errors import SuiteError
from .store import git_commit, init_store, safe_uri, tracking_uri  # noqa: F401 (tracking.tracking_uri etc. for callers)

DEFAULT_EXPERIMENT = "scaling-suite"
CHECKPOINT = "checkpoints/last.pt"


class NullTracker:
    """Logs nothing. The training loop and sweeps take any object with these methods."""

    run_id: str | None = None
    log_seconds: float = 0.0     # time spent logging, for the logging-overhead metric

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_dataset(self, info: dict) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def fetch_checkpoint(self, dst_dir: str | Path) -> Path | None: return None
    def fetch_branch_checkpoint(self, trunk_run_id: str, step: int, dst_dir) -> Path | None: return None
    def copy_history(self, src_run_id: str, keys, max_step: int) -> int: return 0
    def flush(self) -> None: ...
    def discard(self) -> None: ...
    def finish(self, status: str = "FINISHED", reason: str = "") -> None: ...

    @contextlib.contextmanager
    def running(self, stopped: tuple = (), on_error: str = "FAILED"):
        """The one place a run's end status is decided: FINISHED when the block ends normally;
        KILLED on Ctrl-C or SystemExit (the points measured since the last checkpoint are dropped:
        a resume measures them again); KILLED with its message for an exception in STOPPED (a run
        stopped from outside, not broken: a pruned trial); ON_ERROR (FAILED; KILLED for a study's
        parent, which a re-run resumes) on any other error, with the reason as the failure_reason
        tag. The exception goes on. Only a process that created or legitimately attached to the run
        (start_run) holds its tracker, so only it ever changes the run's status."""
        try:
            yield self
        except (KeyboardInterrupt, SystemExit):
            self.discard()
            self.end("KILLED", "interrupted (Ctrl-C or SIGTERM)")
            raise
        except stopped as e:
            self.end("KILLED", str(e))
            raise
        except BaseException as e:
            self.end(on_error, str(e) if isinstance(e, SuiteError) else f"{type(e).__name__}: {e}")
            raise
        self.finish("FINISHED")

    def end(self, status: str, reason: str = "") -> None:
        """finish() while another error is on its way: a store that cannot take the status (it was
        deleted, the server is down) must not replace that error with its own traceback."""
        try:
            self.finish(status, reason)
        except Exception:  # noqa: BLE001 — the caller re-raises the original error
            logging.getLogger(__name__).debug("could not mark run %s %s", self.run_id, status, exc_info=True)


def same_value(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def experiment_id(client, name: str | None) -> str:
    """The experiment of `mlflow run` when there is one, else NAME (created if missing)."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID") and not name:
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    if exp is None:
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(name)
        except MlflowException:
            # Another process created it in between (the name is unique in the store): use theirs.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise SuiteError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
    return exp.experiment_id


class MlflowTracker(NullTracker):
    """One MLflow run. Create with `start_run` (new, nested, attached or resumed)."""

    FLUSH_POINTS = 1000     # log_batch takes at most 1000 metrics per call
    FLUSH_SECONDS = 15.0    # ... and the UI should not lag a running job by much

    def __init__(self, client, run_id: str, system_metrics: bool = True):
        self.client = client
        self.run_id = run_id
        self._buffer: list = []
        self._last_flush = time.monotonic()
        self.log_seconds = 0.0  # time spent inside MLflow calls, to measure logging overhead
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True)
            self._monitor.start()

    # -- writes -------------------------------------------------------------------------------
    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        # `mlflow run` logs its parameters as typed by the user ("1e-3"); ours say "0.001".
        clash = {k: (existing[k], str(v)) for k, v in params.items()
                 if k in existing and not same_value(existing[k], str(v))}
        if clash:
            k, (old, new) = next(iter(clash.items()))
            raise SuiteError(f"run {self.run_id} already has {k}={old}, this run would log {k}={new}")
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self._timed(self.client.log_batch, self.run_id, params=new[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        t = time.perf_counter()
        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items())
        self.log_seconds += time.perf_counter() - t   # buffering; the flush below times itself
        if len(self._buffer) >= self.FLUSH_POINTS or time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            # Points leave the buffer only once MLflow took them: a failed call (the store away
            # longer than MLflow's retries) loses nothing, and the next flush sends them.
            self._timed(self.client.log_batch, self.run_id, metrics=self._buffer[:self.FLUSH_POINTS])
            del self._buffer[:self.FLUSH_POINTS]
        self._last_flush = time.monotonic()

    def discard(self) -> None:
        """Drop the points not yet sent. For an interrupted run: they were measured after its last
        checkpoint (each checkpoint flushes), so a resume measures them again; sent now, they would
        be in the run twice."""
        self._buffer.clear()

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._timed(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(self, info: dict) -> None:
        """Record the corpus as an MLflow dataset input with our own content digest.

        MLflow's automatic digest only covers the first 10,000 elements (mlflow 3.17)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = info["source"]
        url = (f"https://huggingface.co/datasets/{source[3:].split(':')[0]}" if source.startswith("hf:")
               else Path(info.get("path", source)).resolve().as_uri())
        # The public entity, filled as mlflow.data's HTTP source would fill it (source type "http",
        # the source as {"url": ...}), with our digest instead of MLflow's sampled one.
        ds = Dataset(name=info["name"], digest=info["digest"][:36], source_type="http",
                     source=json.dumps({"url": url}))
        tags = [InputTag("mlflow.data.context", "training")]
        inputs = [DatasetInput(ds, tags)]
        try:
            self._timed(self.client.log_inputs, self.run_id, datasets=inputs)
        except Exception:  # noqa: BLE001
            # Two runs registering the same new dataset at once race on MLflow's check-then-insert
            # (seen with parallel workers); the loser finds it registered on the second try.
            time.sleep(0.5)
            self._timed(self.client.log_inputs, self.run_id, datasets=inputs)

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        self._timed(self.client.log_artifact, self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._timed(self.client.log_text, self.run_id, text, artifact_file)

    def fetch_checkpoint(self, dst_dir) -> Path | None:
        return fetch_checkpoint(self.client, self.run_id, dst_dir)

    def fetch_branch_checkpoint(self, trunk_run_id: str, step: int, dst_dir) -> Path | None:
        """The trunk's checkpoint at STEP (checkpoints/branch_<step>.pt), or None if it has none."""
        path = f"checkpoints/branch_{step}.pt"
        if not any(f.path == path for f in self.client.list_artifacts(trunk_run_id, "checkpoints")):
            return None
        return Path(self.client.download_artifacts(trunk_run_id, path, str(dst_dir)))

    def copy_history(self, src_run_id: str, keys, max_step: int) -> int:
        """Log SRC_RUN_ID's points of KEYS with MLflow step <= MAX_STEP to this run (a branch
        carries its trunk's first steps, so its curves are whole in the UI and in load_curves)."""
        from mlflow.entities import Metric

        points = [Metric(k, m.value, m.timestamp, m.step) for k in keys
                  for m in self.client.get_metric_history(src_run_id, k) if m.step <= max_step]
        for i in range(0, len(points), self.FLUSH_POINTS):
            self._timed(self.client.log_batch, self.run_id, metrics=points[i:i + self.FLUSH_POINTS])
        return len(points)

    def finish(self, status: str = "FINISHED", reason: str = "") -> None:
        try:
            if reason:
                self.set_tags({"failure_reason": reason[:5000]})
            self.flush()
        finally:
            if self._monitor is not None:
                self._monitor.finish()
                self._monitor = None
            self._timed(self.client.set_terminated, self.run_id, status)

    def _timed(self, fn, *args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        except SuiteError:
            raise
        except Exception as e:  # noqa: BLE001 — MLflow, SQLAlchemy, OS and HTTP errors alike
            # After MLflow's own retries: the store is gone (deleted, server down). One line; the
            # run's checkpoints already logged are kept, and the run can be resumed.
            raise StoreError(f"the MLflow store {safe_uri(tracking_uri())} failed ({fn.__name__}): "
                             f"{type(e).__name__}: {_gist(e)}") from None
        finally:
            self.log_seconds += time.perf_counter() - t


class StoreError(SuiteError):
    """The tracking store failed mid-run."""


def _gist(e: Exception) -> str:
    """The informative line of a long error (SQLAlchemy's carry the SQL and a parameter dump)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("(raised as a result", "[SQL", "[parameters", "(Background"))]
    return ((useful or lines or [type(e).__name__])[0])[:300]


def start_run(experiment: str | None = None, run_name: str | None = None, tags: dict | None = None,
              parent_run_id: str | None = None, run_id: str | None = None,
              system_metrics: bool = True, reopen: bool = False) -> MlflowTracker:
    """Open a run: resume RUN_ID, else attach to `mlflow run`'s MLFLOW_RUN_ID, else create one
    (nested under PARENT_RUN_ID when given). A FINISHED RUN_ID is refused unless REOPEN (a
    study's parent, re-run by the process that holds the study's lock)."""
    from mlflow.exceptions import MlflowException

    client = init_store()
    base_tags = {"mlflow.source.git.commit": git_commit()}
    attach = run_id or (os.environ.pop("MLFLOW_RUN_ID", None) if not parent_run_id else None)
    if attach:
        try:
            run = client.get_run(attach)
        except MlflowException:
            raise SuiteError(f"no MLflow run {attach!r} in {tracking_uri()}") from None
        # Attach only where this process may own the run: `mlflow run`'s fresh run (RUNNING or
        # SCHEDULED), or with --resume an interrupted one. A refusal leaves the run as it was.
        status = run.info.status
        if run_id is None and status not in ("RUNNING", "SCHEDULED"):
            raise SuiteError(f"MLFLOW_RUN_ID names run {attach}, which is {status}; unset MLFLOW_RUN_ID "
                             "(left over from an earlier `mlflow run`?) to start a new run")
        if run_id is not None and status == "FINISHED" and not reopen:
            raise SuiteError(f"run {attach} is FINISHED: nothing to resume (start a new run instead)")
        if status != "RUNNING":
            client.update_run(attach, status="RUNNING")
        tracker = MlflowTracker(client, attach, system_metrics)
        existing = run.data.tags
        tracker.set_tags({**{k: v for k, v in base_tags.items() if k not in existing}, **(tags or {})})
        return tracker
    # Tag values must be strings over HTTP (a tracking server), though SQLite accepts others.
    all_tags = {k: str(v) for k, v in {**base_tags, **(tags or {})}.items()}
    if parent_run_id:  # a child lives in its parent's experiment, whatever the caller's default
        try:
            exp_id = client.get_run(parent_run_id).info.experiment_id
        except MlflowException:
            raise SuiteError(f"no MLflow parent run {parent_run_id!r} in {tracking_uri()}") from None
        all_tags["mlflow.parentRunId"] = parent_run_id
    else:
        exp_id = experiment_id(client, experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return MlflowTracker(client, run.info.run_id, system_metrics)


def fetch_checkpoint(client, run_id: str, dst_dir) -> Path | None:
    """RUN_ID's last checkpoint, downloaded into DST_DIR, or None when it has none."""
    folder = CHECKPOINT.rsplit("/", 1)[0]
    if not any(f.path == CHECKPOINT for f in client.list_artifacts(run_id, folder)):
        return None
    return Path(client.download_artifacts(run_id, CHECKPOINT, str(dst_dir)))


def find_runs(client, parent_run_id: str, tags: dict) -> list:
    """Runs in the parent's experiment whose tags equal TAGS (newest first)."""
    exp_id = client.get_run(parent_run_id).info.experiment_id
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return list(client.search_runs([exp_id], filt, max_results=5000, order_by=["attributes.start_time DESC"]))


def find_runs_in(client, experiment: str, tags: dict) -> list:
    """Runs of the named experiment whose tags equal TAGS (newest first); none if it is absent."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return list(client.search_runs([exp.experiment_id], filt, max_results=5000,
                                   order_by=["attributes.start_time DESC"]))


def adopt(client, run_id: str, parent_run_id: str) -> None:
    """Nest an earlier attempt's child under the current parent, so one parent shows the study.

    `mlflow run` makes a new parent run on every invocation; a re-run that reuses finished children
    re-points them here (the old parent keeps a `superseded_by` tag).
    """
    run = client.get_run(run_id)
    old = run.data.tags.get("mlflow.parentRunId")
    if old != parent_run_id:
        client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
        if old:
            client.set_tag(old, "superseded_by", parent_run_id)


def find_study(client, experiment: str | None, study_key: str) -> str | None:
    """The newest parent run of this study (same plan), to continue it after an interruption."""
    exp_id = experiment_id(client, experiment)
    runs = client.search_runs([exp_id], f"tags.role = 'study' and tags.study_key = '{study_key}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def run_name(N: float, D: float) -> str:
    """Children are named by their configuration, e.g. `N=1.2M D=24M`, in the MLflow UI."""
    return f"N={_si(N)} D={_si(D)}"


def _si(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"
