"""Datasets -> tokenized uint16 memmaps, cached on disk, plus the batches the training loop reads.
Which documents a dataset string names, and the train/val split, are corpus.py's.

Cache: <cache_dir>/<digest>/{train.bin,val.bin,meta.json[,tokenizer.json]}, built in a temp dir and
renamed into place, so a dir under its final name is always complete. A cache that fails validation
(bad meta, wrong file size, ids >= vocab in a sample) is refused with the command that rebuilds it.
"""

import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from scaling_suite.cache import cache_root
from scaling_suite.corpus import Corpus, open_source, side, val_cut
from scaling_suite.errors import SuiteError
from scaling_suite.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, check_tokenizer, version

CACHE_FORMAT = 1
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


# ------------------------------------------------------------------------------------- tokenize

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

def _build(corpus: Corpus, dest: Path, meta: dict) -> None:
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
        cut = val_cut(corpus)
        if meta["tokenizer"] == "bpe":  # trained on the train split only, so val stays unseen
            tok = BPETokenizer.train(_batches(side(corpus, cut, False)), meta["vocab_size"])
            tok.save(tmp / "tokenizer.json")
            meta["learned_vocab"] = tok.tok.get_vocab_size()
        else:
            tok = ByteTokenizer()
        meta["train_tokens"], meta["n_docs_train"] = _write_tokens(tok, side(corpus, cut, False), tmp / "train.bin")
        meta["val_tokens"], meta["n_docs_val"] = _write_tokens(tok, side(corpus, cut, True), tmp / "val.bin")
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
    corpus = open_source(dataset)
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
    """eval_tokens of val as n_seq >= 1 non-overlapping (context+1)-token windows spread evenly over
    the whole val split (from its first window to its last when n_seq >= 2); x = [:, :-1],
    y = [:, 1:]. The same for every run with the same data/context/eval_tokens.

    Spread, not the first eval_tokens: quick's 16,384 tokens at the head of the stdlib val split are
    one or two files, and the loss there tracked the loss on 266k spread tokens with an s.d. of 1.9%
    across a study's runs, drifting with model quality (the strongest run 5.8% below it, the weakest
    2.6% above), which tilts every fitted exponent; 16,384 spread tokens track it with s.d. 0.35%
    (docs/analysis.md, "The validation set")."""
    width = context + 1
    n_seq, n_windows = max(1, eval_tokens // width), len(data.val) // width
    if n_windows < n_seq:
        raise SuiteError(f"val split of {data.source} has {len(data.val)} tokens but eval_tokens={eval_tokens} "
                         f"with context={context} needs {n_seq * width}; lower eval_tokens or use a larger dataset")
    # Window starts on the grid of whole windows: spacing >= 1 window, so rounding keeps them apart.
    starts = np.rint(np.linspace(0, n_windows - 1, n_seq)).astype(np.int64) * width
    return torch.from_numpy(np.asarray(data.val[starts[:, None] + np.arange(width)], dtype=np.int64))


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
