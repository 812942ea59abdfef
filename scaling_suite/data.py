"""Datasets -> tokenized uint16 memmaps, cached on disk, plus the batches the training loop reads.

Sources (the `dataset` string):
- "stdlib": the .py files of this Python's standard library (offline, ~30 MB), documents = files.
- "hf:NAME[:CONFIG]": datasets.load_dataset(NAME, CONFIG); splits train / validation (or test).
- a path: a file, a directory (recursive, hidden dirs skipped) or a glob of .txt / .jsonl / .parquet
  files; documents = .txt files, or records (field/column "text") of .jsonl / .parquet files.

Train/val split: by document, val iff int(sha1(key), 16) % 100 < VAL_PERCENT, where key is the
relative POSIX path (plus "#record" for jsonl/parquet) or, for hf sets without a val split, the
record index. A corpus too small for that (one side empty, e.g. a single .txt file) is instead cut
by characters: the last VAL_PERCENT% of the text is val.

Cache: <cache_dir>/<digest>/{train.bin,val.bin,meta.json[,tokenizer.json]}, built in a temp dir and
renamed into place, so a dir under its final name is always complete. A cache that fails validation
(bad meta, wrong file size, ids >= vocab in a sample) is rebuilt automatically with a warning: the
tokens are a pure function of the source, so rebuilding loses only time and needs no extra flag.
"""

import glob
import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from scaling_suite.errors import SuiteError
from scaling_suite.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, check_tokenizer, version

VAL_PERCENT = 2
SPLIT_RULE = f"sha1-mod100<{VAL_PERCENT}/char-tail-fallback/v1"  # part of the content digest
CACHE_FORMAT = 1
EXTS = (".txt", ".jsonl", ".parquet")
FORMS = "expected 'stdlib', 'hf:NAME[:CONFIG]', or a path / directory / glob of .txt, .jsonl or .parquet files"
BATCH_CHARS = 1 << 22  # documents are tokenized and written in ~4M-character batches


@dataclass(frozen=True, eq=False, repr=False)  # eq=False: comparing memmaps elementwise makes no sense
class TokenData:
    train: np.ndarray      # uint16 memmap, 1-D
    val: np.ndarray        # uint16 memmap, 1-D
    vocab_size: int
    tokenizer: Tokenizer
    source: str            # the dataset string as given
    digest: str            # cache digest: content digest + tokenizer
    content_digest: str
    n_docs_train: int
    n_docs_val: int

    def __repr__(self):  # the default would print both memmaps
        return (f"TokenData({self.source!r}, {self.tokenizer.name}, vocab {self.vocab_size}, {len(self.train):,} train / "
                f"{len(self.val):,} val tokens, digest {self.digest[:12]})")


@dataclass
class _Corpus:
    content_digest: str
    docs: Callable[[], Iterator[tuple[str, str]]]  # (key, text) in a fixed order, re-iterable
    is_val: Callable[[str], bool]
    short_name: str


def _hash_val(key: str) -> bool:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 100 < VAL_PERCENT


def _digest_files(root: Path, rels: list[str]) -> str:
    """SHA-256 of the files' names and bytes (the content digest, recorded as the run's dataset).

    Hashing the whole standard library (~30 MB) costs seconds on every load, so the digest is
    remembered under a key of each file's name, size and modification time, as git's index and
    make do: a file rewritten with other bytes gets a new mtime, hence a new key and a full hash.
    """
    stats = [(rel, (st := (root / rel).stat()).st_size, st.st_mtime_ns) for rel in rels]
    key = hashlib.sha256(json.dumps([SPLIT_RULE, str(root.resolve()), stats]).encode()).hexdigest()
    memo = cache_root() / "content_digests.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    h = hashlib.sha256(SPLIT_RULE.encode())
    for rel in rels:
        data = (root / rel).read_bytes()
        h.update(f"\0{rel}\0{len(data)}\0".encode("utf-8"))  # lengths keep the framing unambiguous
        h.update(data)
    digest = h.hexdigest()
    try:  # best effort: an unwritable cache only costs the next load a full hash
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**(known if isinstance(known, dict) else {}), key: digest}, indent=0))
        tmp.replace(memo)
    except OSError:
        pass
    return digest


# ---------------------------------------------------------------------------------------- sources

def stdlib_files(root: str | Path) -> list[str]:
    """Sorted relative POSIX paths of the .py files under root, without third-party packages."""
    root, rels = Path(root), []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        rels += [(Path(d) / f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    return sorted(rels)


def _stdlib() -> _Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = stdlib_files(root)
    if not rels:
        raise SuiteError(f"no .py files found in the standard library directory {root}")

    def docs():
        for rel in rels:
            yield rel, (root / rel).read_bytes().decode("utf-8", errors="replace")
    return _Corpus(_digest_files(root, rels), docs, _hash_val, "stdlib")


def _local(dataset: str) -> _Corpus:
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
    return _Corpus(_digest_files(root, rels), docs, _hash_val, os.path.basename(path.rstrip("/")) or path)


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
        import pyarrow.parquet as pq
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
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session
    try:  # same HTTP client (and proxy settings) as the downloads
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:
        return False


def load_hf(dataset: str):
    """datasets.load_dataset for "hf:NAME[:CONFIG]" -> DatasetDict; fails in seconds when offline."""
    name, config = _parse_hf(dataset)
    import datasets
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


def _hf(dataset: str) -> _Corpus:
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
    return _Corpus(h.hexdigest(), docs, is_val, dataset)


def _open_source(dataset: str) -> _Corpus:
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

def _plan(corpus: _Corpus) -> int | None:
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


def _side(corpus: _Corpus, cut: int | None, val: bool) -> Iterator[str]:
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


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, n = [], 0
    for t in texts:
        batch.append(t)
        n += len(t)
        if n >= BATCH_CHARS:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _write_tokens(tok, texts: Iterator[str], path: Path) -> tuple[int, int]:
    n_tok = n_docs = 0
    with open(path, "wb") as f:
        for batch in _batches(texts):
            ids = tok.encode_docs(batch)
            f.write(ids.tobytes())
            n_tok, n_docs = n_tok + ids.size, n_docs + len(batch)
        f.flush()
        os.fsync(f.fileno())
    return n_tok, n_docs


# ---------------------------------------------------------------------------------------- cache

def cache_root(cache_dir: str | None = None) -> Path:
    """The suite's cache: token memmaps here, compiled kernels and their warm-ups (device.py)."""
    root = cache_dir or os.environ.get("SCALING_SUITE_CACHE") or "~/.cache/scaling-suite"
    return Path(os.path.expanduser(root))


def _build(corpus: _Corpus, dest: Path, meta: dict) -> None:
    for old in dest.parent.glob(f".tmp-{dest.name}-*"):  # left by a killed build of the same digest
        try:
            os.kill(int(old.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, OSError):
            pass  # alive, or not ours to judge
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise SuiteError(f"cannot create the token cache in {dest.parent}: {e}") from None
    try:
        cut = _plan(corpus)
        if meta["tokenizer"] == "bpe":  # trained on the train split only, so val stays unseen
            tok = BPETokenizer.train(_batches(_side(corpus, cut, False)), meta["vocab_size"])
            tok.save(tmp / "tokenizer.json")
            meta["learned_vocab"] = tok.tok.get_vocab_size()
        else:
            tok = ByteTokenizer()
        meta["train_tokens"], meta["n_docs_train"] = _write_tokens(tok, _side(corpus, cut, False), tmp / "train.bin")
        meta["val_tokens"], meta["n_docs_val"] = _write_tokens(tok, _side(corpus, cut, True), tmp / "val.bin")
        meta["split"] = "by-document" if cut is None else "character-tail"
        with open(tmp / "meta.json", "w") as f:  # written last: its presence marks a complete build
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, dest)  # atomic; fails if another process finished the same build first
        except OSError:
            if not (dest / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SCAN_CHUNK = 1 << 24   # tokens checked per step of the load-time scan (32 MB of uint16)


def _open(dest: Path, want: dict):
    """Open and validate a cache dir -> (train, val, tokenizer, meta); raises ValueError if corrupt."""
    try:
        meta = json.loads((dest / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"meta.json unreadable: {type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not an object")
    for k, v in want.items():
        if meta.get(k) != v:
            raise ValueError(f"meta.json {k}={meta.get(k)!r}, expected {v!r}")
    arrays = []
    for split in ("train", "val"):
        n, path = meta.get(f"{split}_tokens"), dest / f"{split}.bin"
        if not isinstance(n, int) or n < 1 or not path.exists() or path.stat().st_size != 2 * n:
            raise ValueError(f"{split}.bin does not hold the {n} tokens meta.json records")
        arr = np.memmap(path, dtype=np.uint16, mode="r")
        # Every token, in chunks: a sample missed a single bad id, which then stopped the run
        # mid-way with an IndexError in the embedding. The scan reads the file once at load
        # (about 1 GB/s; the stdlib cache in tens of ms), far less than training on it.
        for i in range(0, n, SCAN_CHUNK):
            top = int(arr[i:i + SCAN_CHUNK].max())
            if top >= meta["vocab_size"]:
                at = i + int(np.argmax(arr[i:i + SCAN_CHUNK] >= meta["vocab_size"]))
                raise ValueError(f"{split}.bin has token id {int(arr[at])} >= vocab_size {meta['vocab_size']} "
                                 f"at position {at}")
        arrays.append(arr)
    if meta["tokenizer"] == "bpe":
        try:
            tok = BPETokenizer.load(dest / "tokenizer.json", meta["vocab_size"])
        except Exception as e:
            raise ValueError(f"tokenizer.json unreadable: {type(e).__name__}") from None
        if tok.tok.get_vocab_size() > meta["vocab_size"]:
            raise ValueError("tokenizer.json has more tokens than vocab_size")
    else:
        tok = ByteTokenizer()
    return arrays[0], arrays[1], tok, meta


def load_data(dataset: str = "stdlib", tokenizer: str = "byte", vocab_size: int = 256,
              cache_dir: str | None = None) -> TokenData:
    vocab_size = check_tokenizer(tokenizer, vocab_size)
    corpus = _open_source(dataset)
    key = [corpus.content_digest, tokenizer, vocab_size, version(tokenizer)]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    want = {"format": CACHE_FORMAT, "digest": digest, "content_digest": corpus.content_digest,
            "tokenizer": tokenizer, "vocab_size": vocab_size, "tokenizer_version": version(tokenizer)}
    dest = cache_root(cache_dir) / digest
    if dest.exists():
        try:
            train, val, tok, meta = _open(dest, want)
            return _token_data(train, val, tok, meta, dataset)
        except ValueError as e:
            # Refuse rather than silently rebuild: a cache that rots on disk is worth knowing
            # about, and deleting it is one command.
            raise SuiteError(f"token cache {dest} is corrupt ({e}); delete it (rm -r {dest}) "
                             "and run again to rebuild it") from None
    _build(corpus, dest, dict(want, source=dataset, name=corpus.short_name))
    try:
        train, val, tok, meta = _open(dest, want)
    except ValueError as e:
        raise SuiteError(f"token cache {dest} is corrupt right after building it ({e}); check the disk") from None
    return _token_data(train, val, tok, meta, dataset)


def _token_data(train, val, tok, meta, dataset) -> TokenData:
    return TokenData(train=train, val=val, vocab_size=meta["vocab_size"], tokenizer=tok, source=dataset,
                     digest=meta["digest"], content_digest=meta["content_digest"],
                     n_docs_train=meta["n_docs_train"], n_docs_val=meta["n_docs_val"])


# ---------------------------------------------------------------------------------- batches

def validation_set(data: TokenData, eval_tokens: int, context: int) -> torch.Tensor:
    """The first eval_tokens of val as non-overlapping (n_seq, context+1) windows, n_seq >= 1;
    x = [:, :-1], y = [:, 1:]. The same for every run with the same data/context/eval_tokens."""
    n_seq = max(1, eval_tokens // (context + 1))
    need = n_seq * (context + 1)
    if len(data.val) < need:
        raise SuiteError(f"val split of {data.source} has {len(data.val)} tokens but eval_tokens={eval_tokens} "
                         f"with context={context} needs {need}; lower eval_tokens or use a larger dataset")
    return torch.from_numpy(np.asarray(data.val[:need], dtype=np.int64).reshape(n_seq, context + 1))


def bytes_per_token(data: TokenData, val_tokens: torch.Tensor) -> float:
    """UTF-8 bytes per target token of the eval set: val_bpb = val_loss / ln(2) / bytes_per_token."""
    targets = val_tokens[:, 1:]
    return data.tokenizer.token_bytes(targets) / targets.numel()


def train_batch(data: TokenData, seed: int, step: int, batch_size: int, context: int) -> torch.Tensor:
    """(batch_size, context+1) int64 windows at offsets from default_rng([seed, step])."""
    n = len(data.train) - context
    if n < 1:
        raise SuiteError(f"train split of {data.source} has {len(data.train)} tokens, fewer than context+1={context + 1}")
    starts = np.random.default_rng([seed, step]).integers(0, n, size=batch_size)
    idx = starts[:, None] + np.arange(context + 1)  # fancy indexing reads only these tokens
    return torch.from_numpy(data.train[idx].astype(np.int64))


def describe(data: TokenData) -> dict:
    """Identity and size of the data, for MLflow's dataset input and params. "path" (local sources
    only) is where the files are, for the input's source URI."""
    tok = data.tokenizer.name if data.tokenizer.name == "byte" else f"bpe-{data.vocab_size}"
    info = {"name": "", "digest": data.digest, "content_digest": data.content_digest,
            "source": data.source, "tokenizer": data.tokenizer.name, "vocab_size": data.vocab_size,
            "train_tokens": len(data.train), "val_tokens": len(data.val),
            "n_docs_train": data.n_docs_train, "n_docs_val": data.n_docs_val}
    if data.source == "stdlib":
        info["path"], short = sysconfig.get_paths()["stdlib"], "stdlib"
    elif data.source.startswith("hf:"):
        short = data.source
    else:
        info["path"] = os.path.abspath(os.path.expanduser(data.source))
        short = os.path.basename(data.source.rstrip("/")) or data.source
    info["name"] = f"{short}/{tok}"
    return info
