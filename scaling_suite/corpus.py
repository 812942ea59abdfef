"""Corpus sources: which documents a `dataset` string names, their content digest, and the
train/val split. data.py tokenizes them into the token cache.

Sources (the `dataset` string):
- "stdlib": the .py files of this Python's standard library (offline, ~30 MB), documents = files.
- "hf:NAME[:CONFIG]": datasets.load_dataset(NAME, CONFIG); splits train / validation (or test).
- a path: a file, a directory (recursive, hidden dirs skipped) or a glob of .txt / .jsonl / .parquet
  files; documents = .txt files, or records (field/column "text") of .jsonl / .parquet files.

Train/val split: by document, val iff int(sha1(key), 16) % 100 < VAL_PERCENT, where key is the
relative POSIX path (plus "#record" for jsonl/parquet) or, for hf sets without a val split, the
record index. A corpus too small for that (one side empty, e.g. a single .txt file) is instead cut
by characters: the last VAL_PERCENT% of the text is val.
"""

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from scaling_suite.cache import cache_root, read_json, write_json
from scaling_suite.errors import SuiteError

VAL_PERCENT = 2
SPLIT_RULE = f"sha1-mod100<{VAL_PERCENT}/char-tail-fallback/v1"  # part of the content digest
EXTS = (".txt", ".jsonl", ".parquet")
FORMS = "expected 'stdlib', 'hf:NAME[:CONFIG]', or a path / directory / glob of .txt, .jsonl or .parquet files"


@dataclass
class Corpus:
    content_digest: str
    docs: Callable[[], Iterator[tuple[str, str]]]  # (key, text) in a fixed order, re-iterable
    is_val: Callable[[str], bool]
    short_name: str


def _hash_val(key: str) -> bool:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 100 < VAL_PERCENT


def digest_files(root: Path, rels: list[str]) -> str:
    """SHA-256 of the files' names and bytes (the content digest, recorded as the run's dataset).

    Hashing the whole standard library (~30 MB) costs seconds on every load, so the digest is
    remembered under a key of each file's name, size and modification time, as git's index and
    make do: a file rewritten with other bytes gets a new mtime, hence a new key and a full hash.
    """
    stats = [(rel, (st := (root / rel).stat()).st_size, st.st_mtime_ns) for rel in rels]
    key = hashlib.sha256(json.dumps([SPLIT_RULE, str(root.resolve()), stats]).encode()).hexdigest()
    memo = cache_root() / "content_digests.json"
    known = read_json(memo)
    if isinstance(known.get(key), str):
        return known[key]
    h = hashlib.sha256(SPLIT_RULE.encode())
    for rel in rels:
        data = (root / rel).read_bytes()
        h.update(f"\0{rel}\0{len(data)}\0".encode("utf-8"))  # lengths keep the framing unambiguous
        h.update(data)
    digest = h.hexdigest()
    write_json(memo, {**known, key: digest})   # best effort: unwritable, the next load hashes again
    return digest


# ---------------------------------------------------------------------------------------- sources

def stdlib_files(root: str | Path) -> list[str]:
    """Sorted relative POSIX paths of the .py files under root, without third-party packages."""
    root, rels = Path(root), []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        rels += [(Path(d) / f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    return sorted(rels)


def _stdlib() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = stdlib_files(root)
    if not rels:
        raise SuiteError(f"no .py files found in the standard library directory {root}")

    def docs():
        for rel in rels:
            yield rel, (root / rel).read_bytes().decode("utf-8", errors="replace")
    return Corpus(digest_files(root, rels), docs, _hash_val, "stdlib")


def _local(dataset: str) -> Corpus:
    path = os.path.expanduser(dataset)
    if glob.has_magic(path):
        prefix = path[:min(path.find(c) for c in "*?[" if c in path)]
        root = Path(os.path.dirname(prefix) or ".")
        found = [Path(p) for p in glob.glob(path, recursive=True)]
        files = [p for p in found if p.is_file()] + [f for p in found if p.is_dir() for f in _walk(p)]
    elif os.path.isdir(path):
        root, files = Path(path), _walk(Path(path))
    elif os.path.isfile(path):
        if not path.endswith(EXTS):
            raise SuiteError(f"dataset file {dataset} is not .txt, .jsonl or .parquet")
        root, files = Path(path).parent, [Path(path)]
    else:
        raise SuiteError(f"dataset path {dataset} does not exist ({FORMS})")
    rels = sorted({p.relative_to(root).as_posix() for p in files if p.suffix in EXTS})
    if not rels:
        raise SuiteError(f"no .txt, .jsonl or .parquet files found at {dataset}")

    def docs():
        for rel in rels:
            yield from _read_file(root / rel, rel)
    return Corpus(digest_files(root, rels), docs, _hash_val, os.path.basename(path.rstrip("/")) or path)


def _walk(d: Path) -> list[Path]:
    out = []
    for sub, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "__pycache__")
        out += [Path(sub) / f for f in files if f.endswith(EXTS)]
    return out


def _read_file(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    if path.suffix == ".txt":
        yield rel, path.read_bytes().decode("utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise SuiteError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
                yield f"{rel}#{i}", "" if text is None else str(text)
    else:
        import pyarrow.parquet as pq   # lazy heavy library (datasets' dependency): only for .parquet files
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # not a parquet file, unreadable
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise SuiteError(f"cannot read {path} as parquet: {why}") from None
        names = pf.schema_arrow.names
        if "text" not in names:
            shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
            raise SuiteError(f"{path} has no 'text' column; its columns: {shown or 'none'}")
        try:
            batches = pf.iter_batches(columns=["text"])
            for i, text in enumerate(t for b in batches for t in b.column(0).to_pylist()):
                yield f"{rel}#{i}", "" if text is None else str(text)
        except Exception as e:  # missing column, not a parquet file, ...
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise SuiteError(f"cannot read {path} as parquet with a 'text' column: {why}") from None


def _parse_hf(dataset: str) -> tuple[str, str | None]:
    name, _, config = dataset[3:].partition(":")
    if not name:
        raise SuiteError(f"empty dataset name in {dataset!r} ({FORMS})")
    return name, config or None


def _hub_reachable(timeout: float = 5.0) -> bool:
    from huggingface_hub import constants   # lazy heavy library: only for hf: sources
    from huggingface_hub.utils import get_session
    try:  # same HTTP client (and proxy settings) as the downloads
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:
        return False


def load_hf(dataset: str):
    """datasets.load_dataset for "hf:NAME[:CONFIG]" -> DatasetDict; fails in seconds when offline."""
    name, config = _parse_hf(dataset)
    import datasets   # lazy heavy library: only for hf: sources
    from huggingface_hub import constants
    # Offline, huggingface_hub retries each request with backoff (~25 s per file here). If the hub
    # does not answer a quick probe, switch to offline mode for this call: a dataset already in
    # the local HF cache still loads, anything else fails immediately.
    env = {os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    offline = (datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE  # read at import time
               or bool(env & {"1", "ON", "YES", "TRUE"}))
    local = os.path.exists(name)  # load_dataset also reads local dirs of data files; no hub needed
    offline = offline or (not local and not _hub_reachable())
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, config)
    except Exception as e:
        if local:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        elif offline or isinstance(e, (ConnectionError, TimeoutError)):
            why = "Hugging Face hub unreachable (offline?)"
        elif isinstance(e, (datasets.exceptions.DatasetNotFoundError, FileNotFoundError)):
            why = "not found on the Hugging Face hub (or gated / private)"
        else:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        raise SuiteError(f"cannot load {dataset}: {why} — use dataset=stdlib or a local path") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _split_identity(ds, col: str) -> str:
    """What identifies a split's data without a pass over a possibly huge corpus on every load.

    load_dataset writes each split as Arrow files under the datasets cache, in a folder named by a
    hash of the builder's config and its data files (the hub revision, or the local files), so
    their paths relative to that cache, with their sizes, are the same on every machine for the
    same data (`Dataset.cache_files`, public API). A split held only in memory is small: its text
    is hashed.
    """
    import datasets  # optional heavy dependency, imported only for hf: sources (load_hf)

    root = Path(datasets.config.HF_DATASETS_CACHE).resolve()
    parts = []
    for f in ds.cache_files:
        path = Path(f["filename"]).resolve()
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        parts.append(f"{name}:{path.stat().st_size}")
    if parts:
        return "|".join(parts)
    h = hashlib.sha256()
    for batch in ds.select_columns([col]).iter(batch_size=1000):
        for text in batch[col]:
            h.update((text or "").encode("utf-8") + b"\0")
    return h.hexdigest()


def _hf(dataset: str) -> Corpus:
    dd = load_hf(dataset)
    if "train" not in dd:
        raise SuiteError(f"{dataset} has no 'train' split (splits: {', '.join(dd)})")
    val_split = next((s for s in ("validation", "test") if s in dd), None)
    splits = ["train"] + ([val_split] if val_split else [])
    ds = dd["train"]
    cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not cols:
        raise SuiteError(f"{dataset} has no string column (columns: {', '.join(ds.features)})")
    col = "text" if "text" in cols else cols[0]
    h = hashlib.sha256(f"{SPLIT_RULE}\0{dataset}\0{col}".encode())
    for s in splits:
        h.update(f"\0{s}\0{dd[s].num_rows}\0{_split_identity(dd[s], col)}".encode())

    def docs():
        for s in splits:
            i = 0
            for batch in dd[s].select_columns([col]).iter(batch_size=1000):
                for text in batch[col]:
                    yield f"{s}/{i}", text or ""
                    i += 1

    def is_val(key):
        split, _, i = key.partition("/")
        return split != "train" if val_split else _hash_val(i)  # by document index
    return Corpus(h.hexdigest(), docs, is_val, dataset)


def open_source(dataset: str) -> Corpus:
    if not isinstance(dataset, str) or not dataset:
        raise SuiteError(f"dataset must be a non-empty string ({FORMS})")
    if dataset == "stdlib":
        return _stdlib()
    if dataset.startswith("hf:"):
        return _hf(dataset)
    looks_like_path = (os.sep in dataset or "/" in dataset or dataset.startswith((".", "~"))
                       or dataset.endswith(EXTS) or glob.has_magic(dataset) or os.path.exists(dataset))
    if looks_like_path:
        return _local(dataset)
    raise SuiteError(f"unknown dataset {dataset!r}: {FORMS}")


# ------------------------------------------------------------------------------- split + tokenize

def val_cut(corpus: Corpus) -> int | None:
    """None for the by-document split, else the character offset where val starts."""
    n_train = n_val = chars = 0
    for key, text in corpus.docs():
        if text:
            n_val += corpus.is_val(key)
            n_train += not corpus.is_val(key)
            chars += len(text)
    if chars < 2:
        raise SuiteError(f"dataset {corpus.short_name} is empty (no text)")
    if n_train and n_val:
        return None
    return chars - max(1, chars * VAL_PERCENT // 100)


def side(corpus: Corpus, cut: int | None, val: bool) -> Iterator[str]:
    pos = 0
    for key, text in corpus.docs():
        if not text:
            continue
        if cut is None:
            if corpus.is_val(key) == val:
                yield text
            continue
        a, pos = pos, pos + len(text)
        piece = text[max(cut - a, 0):] if val else text[:max(min(cut, pos) - a, 0)]
        if piece:
            yield piece
