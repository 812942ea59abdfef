"""The suite's cache folder (token memmaps, compiled kernels, remembered digests and warm-ups) and
its small JSON records, written so that a reader never sees half a file."""

import json
import os
from pathlib import Path


def cache_root(cache_dir: str | None = None) -> Path:
    """The suite's cache: token memmaps (data.py), content digests (corpus.py), compiled kernels
    and their warm-ups (compiling.py)."""
    root = cache_dir or os.environ.get("SCALING_SUITE_CACHE") or "~/.cache/scaling-suite"
    return Path(os.path.expanduser(root))


def read_json(path: Path) -> dict:
    """A JSON object record, or {} when it is missing, unreadable or not an object (a damaged
    record is ignored and rewritten, not trusted)."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def write_json(path: Path, obj) -> bool:
    """Write OBJ as JSON to PATH atomically (a temporary file per process, then a rename), so
    concurrent readers and writers see the old record or the new one, never a torn one. Best
    effort: False when the folder is not writable (the callers' records are hints)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        tmp.replace(path)
        return True
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False
