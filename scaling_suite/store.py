"""Where runs are kept: the MLflow store's URI, opening (and once creating) it, a tracking server's
health, the file locks beside it, and scratch folders for files on their way to it as artifacts.
tracking.py writes the runs.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import SuiteError

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"


def quiet_downloads(quiet: bool) -> None:
    """--quiet also silences MLflow's "Downloading artifacts" bar (checkpoints fetched to resume)."""
    if quiet:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (obey it), else a SQLite store under ./mlruns."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def init_store(uri: str | None = None):
    """Point MLflow at the store and create it once, before any worker opens it.

    Several processes migrating a fresh SQLite schema at once crash (3 of 4 did here), so the store is
    created here, in one process, and an unwritable location fails with one clear line.
    """
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            probe = db.parent / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise SuiteError(f"cannot write the MLflow store {uri}: {e.strerror or e}") from None
    import mlflow   # lazy heavy library (tracking.py says why)
    from mlflow import MlflowClient

    # MLflow's INFO lines (table creation, system-metrics thread start/stop) drown the progress
    # bar and the one-line errors; warnings and errors still show.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # This one logs every database error with its traceback before raising it; the raised error
    # reaches the user anyway, as one line (MlflowTracker._timed, init_store below).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    try:
        # The client builds MLflow's store object (importing a database URL's driver), which creates
        # and migrates the schema of a fresh database: one process at a time (fcntl lock beside
        # the db), so processes started together all find a whole schema. Later opens only read
        # the schema version.
        with (FileLock(Path(uri[len("sqlite:///"):] + ".lock")) if uri.startswith("sqlite:///")
              else contextlib.nullcontext()):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 — any store failure is the user's to fix, in one line
        raise SuiteError(f"cannot open the MLflow store {safe_uri(uri)}: {type(e).__name__}: {e}") from None
    return client


def safe_uri(uri: str) -> str:
    """URI with a password masked (user:***@host), for messages and tags: tracking servers and
    database URLs alike (the one masking rule; a password in a valid URL is percent-encoded)."""
    return re.sub(r"(//[^/:@]+:)[^/@]+@", r"\1***@", uri)


SERVER_TRIES = 3
SERVER_TIMEOUT = 4.0   # seconds per try: a server that does not answer fails in about 15 s


def check_server(uri: str) -> None:
    """Fail in one line when the tracking server does not answer, within about 15 s.

    MLflow's own client retries 7 times with exponential backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    _BACKOFF_FACTOR; about 4 minutes), right for a blip mid-run (the metrics wait in the
    tracker's buffer meanwhile) but a long silence at start. Any HTTP answer counts: only a
    refused or timed-out connection fails here."""
    import requests   # lazy: only an HTTP tracking server needs it

    url = uri.rstrip("/") + "/health"
    for i in range(SERVER_TRIES):
        try:
            requests.get(url, timeout=SERVER_TIMEOUT)
            return
        except requests.RequestException as e:
            err = e
            if i + 1 < SERVER_TRIES:
                time.sleep(1.0)
    reason = type(err).__name__ + (": connection refused" if "refused" in str(err).lower() else "")
    raise SuiteError(f"the MLflow tracking server {uri} does not answer ({reason}, {SERVER_TRIES} tries); "
                     "start it, or point MLFLOW_TRACKING_URI elsewhere")


class FileLock:
    """An exclusive fcntl lock on PATH (created 0600 if missing). The kernel releases it when the
    holder exits or dies, so a lock held means a live process on this machine. Not across machines:
    many machines coordinate through the Optuna storage (worker.py)."""

    def __init__(self, path: Path, blocking: bool = True):
        self.path, self.blocking, self.fd = Path(path), blocking, None

    def acquire(self, blocking: bool | None = None) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if (self.blocking if blocking is None else blocking) else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def lock_dir(uri: str | None = None) -> Path:
    """Where a store's claim locks live: beside a SQLite db, else in the user's cache (one folder
    per store URL)."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):] + ".locks")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "scaling-suite" / "locks" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"




_SCRATCH: list[Path] = []


def scratch_dir() -> Path:
    """A temporary folder for files that go to MLflow as artifacts (plots, reports), removed when
    the process exits. Per-run files (checkpoints, often gigabytes) use `scratch`, removed when
    the run ends."""
    path = Path(tempfile.mkdtemp(prefix="scaling-suite-"))
    if not _SCRATCH:
        atexit.register(_remove_scratch)
    _SCRATCH.append(path)
    return path


def _remove_scratch() -> None:
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


@contextlib.contextmanager
def scratch():
    """A temporary folder removed when the block ends, however it ends."""
    path = Path(tempfile.mkdtemp(prefix="scaling-suite-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
