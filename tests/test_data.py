import json
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shutil

import pytest
import torch

from scaling_suite import corpus
from scaling_suite import data as D
from scaling_suite.data import bytes_per_token, describe, load_data, train_batch, validation_set
from scaling_suite.errors import SuiteError

UNICODE = "naïve café — 日本語のテキスト, emoji 😀🚀, Ελληνικά, עברית\n"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_SUITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def corpus_dir(root: Path, n=120) -> Path:
    """n small .txt documents with enough repetition for a BPE to learn merges."""
    d = root / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(n):
        where = d / "sub" if i % 3 else d
        (where / f"doc{i:03d}.txt").write_text(f"document {i}\n" + f"def f{i}(x):\n    return x * {i}\n" * 5 + UNICODE)
    return d


def stream(data, split):
    return data.tokenizer.decode(getattr(data, split))


# ------------------------------------------------------------------------------------- stdlib

def test_stdlib_deterministic_split_by_file(tmp_path):
    a = load_data("stdlib", cache_dir=str(tmp_path / "a"))
    b = load_data("stdlib", cache_dir=str(tmp_path / "b"))  # a second, independent build
    assert a.digest == b.digest and a.content_digest == b.content_digest
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train.dtype == np.uint16 and isinstance(a.train, np.memmap)

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = {r: (root / r).read_bytes().decode("utf-8", errors="replace") for r in corpus.stdlib_files(root)}
    val = [r for r, t in texts.items() if t and corpus._hash_val(r)]
    train = [r for r, t in texts.items() if t and not corpus._hash_val(r)]
    assert val and train and not set(val) & set(train)
    assert (a.n_docs_train, a.n_docs_val) == (len(train), len(val))
    # val.bin is exactly the val files, whole, in sorted order: the split is by file
    assert a.val.astype(np.uint8).tobytes() == "".join(texts[r] + "\n\n" for r in val).encode()
    assert a.train[:200_000].astype(np.uint8).tobytes() == "".join(texts[r] + "\n\n" for r in train).encode()[:200_000]
    assert len(a.val) >= 100_000  # enough for a default-sized eval set

    c = load_data("stdlib", cache_dir=str(tmp_path / "a"))  # cached
    assert c.digest == a.digest and np.array_equal(c.val, a.val)
    info = describe(c)
    assert info["digest"] == a.digest and info["train_tokens"] == len(a.train) and info["vocab_size"] == 256
    assert info["name"] == "stdlib/byte" and info["path"] == str(root)


def test_stdlib_excludes_third_party(tmp_path):
    for rel in ["a.py", "pkg/b.py", "site-packages/x.py", "pkg/dist-packages/y.py", "__pycache__/z.py", "c.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert corpus.stdlib_files(tmp_path) == ["a.py", "pkg/b.py"]
    real = corpus.stdlib_files(sysconfig.get_paths()["stdlib"])
    assert real == sorted(real) and "os.py" in real
    assert not [r for r in real if {"site-packages", "dist-packages", "__pycache__"} & set(r.split("/"))]


# ---------------------------------------------------------------------------------- tokenizers

def test_byte_round_trip():
    tok = D.ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert max(ids) < 256 and tok.decode(ids) == UNICODE
    assert tok.token_bytes(ids) == len(UNICODE.encode()) and tok.vocab_size == 256 and tok.name == "byte"


def test_bpe_round_trip_and_cache(tmp_path, cache):
    d = load_data(str(corpus_dir(tmp_path)), tokenizer="bpe", vocab_size=512)
    tok = d.tokenizer
    assert tok.name == "bpe" and tok.vocab_size == d.vocab_size == 512
    for s in [UNICODE, "def f(x):\n    return x\n", "literal <|endoftext|> stays text", ""]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s and tok.token_bytes(ids) == len(s.encode())
    assert max(int(d.train.max()), int(d.val.max())) < 512
    assert len(tok.encode(UNICODE * 3)) < len(UNICODE.encode()) * 3  # merges were learned
    # documents end with <|endoftext|> (id 0), which counts no bytes
    assert int((d.train == tok.eot).sum()) == d.n_docs_train and tok.eot == 0
    text = stream(d, "val").replace("<|endoftext|>", "")
    assert tok.token_bytes(d.val) == len(text.encode())
    assert (cache / d.digest / "tokenizer.json").exists()
    again = load_data(str(tmp_path / "corpus"), tokenizer="bpe", vocab_size=512)  # cached, same tokenizer
    assert again.digest == d.digest and again.tokenizer.encode(UNICODE) == tok.encode(UNICODE)
    assert load_data(str(tmp_path / "corpus"), tokenizer="bpe", vocab_size=600).digest != d.digest


# ------------------------------------------------------------------------------- local sources

def test_local_txt_file_char_split(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("".join(f"line {i} {UNICODE}" for i in range(300)))
    d = load_data(str(f))
    # one document: cut by characters, last VAL_PERCENT % is val
    text = f.read_text()
    assert stream(d, "train") + stream(d, "val") == text[:len(text) - len(text) * 2 // 100] + "\n\n" + \
        text[len(text) - len(text) * 2 // 100:] + "\n\n"
    assert (d.n_docs_train, d.n_docs_val) == (1, 1)


def test_local_dir_and_glob(tmp_path):
    root = corpus_dir(tmp_path)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text("hidden")
    (root / "notes.md").write_text("not a corpus file")
    d = load_data(str(root))
    assert d.n_docs_train + d.n_docs_val == 120 and d.n_docs_val > 0
    assert "hidden" not in stream(d, "train") + stream(d, "val")
    g = load_data(str(root / "**" / "*.txt"))
    assert g.n_docs_train + g.n_docs_val == 120
    only_top = load_data(str(root / "doc*.txt"))
    assert only_top.n_docs_train + only_top.n_docs_val == 40
    assert describe(d)["name"] == "corpus/byte" and describe(d)["path"] == str(root)


def test_local_jsonl_and_parquet(tmp_path):
    records = [f"record {i}: {UNICODE}" for i in range(200)]
    (tmp_path / "j").mkdir()
    with open(tmp_path / "j" / "a.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"text": r, "id": 1}) + "\n\n")  # blank lines are skipped
    j = load_data(str(tmp_path / "j" / "a.jsonl"))
    assert j.n_docs_train + j.n_docs_val == 200 and j.n_docs_val > 0
    everything = stream(j, "train") + stream(j, "val")
    assert all(r in everything for r in records)
    assert len(j.train) + len(j.val) == sum(len(r.encode()) + 2 for r in records)  # + "\n\n" each
    pq.write_table(pa.table({"id": list(range(200)), "text": records}), tmp_path / "p.parquet")
    p = load_data(str(tmp_path / "p.parquet"))
    assert p.n_docs_train + p.n_docs_val == 200
    assert len(p.train) + len(p.val) == len(j.train) + len(j.val)


# ------------------------------------------------------------------------------------ hf path

def test_hf_local_parquet_dir(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    d = tmp_path / "hfdata"
    d.mkdir()
    pq.write_table(pa.table({"id": list(range(300)), "text": [f"train {i} {UNICODE}" for i in range(300)]}),
                   d / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": [f"valid {i}" for i in range(7)]}), d / "validation-00000-of-00001.parquet")
    data = load_data(f"hf:{d}")
    assert (data.n_docs_train, data.n_docs_val) == (300, 7)
    assert stream(data, "val").startswith("valid 0\n\nvalid 1\n\n")
    assert load_data(f"hf:{d}").digest == data.digest

    (d / "validation-00000-of-00001.parquet").unlink()  # no val split: split train by index hash
    only = load_data(f"hf:{d}")
    val_idx = [i for i in range(300) if corpus._hash_val(str(i))]
    assert (only.n_docs_train, only.n_docs_val) == (300 - len(val_idx), len(val_idx))
    assert stream(only, "val").startswith(f"train {val_idx[0]} ")


def test_hf_unknown_offline_is_quick(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(SuiteError, match=r"^cannot load hf:nobody/no-such-dataset: Hugging Face hub unreachable") as e:
        load_data("hf:nobody/no-such-dataset")
    assert "\n" not in str(e.value) and time.time() - t < 10


def test_hf_unknown_without_offline_flag_is_quick(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(corpus, "_hub_reachable", lambda timeout=5.0: False)  # what the probe answers offline
    t = time.time()
    with pytest.raises(SuiteError, match=r"^cannot load hf:nobody/no-such-dataset:.*offline"):
        load_data("hf:nobody/no-such-dataset:cfg")
    assert time.time() - t < 10


# ---------------------------------------------------------------------------- batches / eval

@pytest.fixture
def small(tmp_path):
    return load_data(str(corpus_dir(tmp_path)))


def test_validation_set(small):
    """Windows of whole (context+1) tokens spread evenly over the val split, first and last included,
    so a small eval set samples many documents instead of the first one or two (data.validation_set
    says what the first tokens cost on stdlib)."""
    v = validation_set(small, eval_tokens=100, context=16)
    assert v.shape == (100 // 17, 17) and v.dtype == torch.int64
    assert torch.equal(v, validation_set(small, 100, 16))
    val = small.val.astype(np.int64)
    n_windows = len(val) // 17
    starts = [next(j for j in range(n_windows) if np.array_equal(val[17 * j:17 * j + 17], w)) for w in v.numpy()]
    assert starts[0] == 0 and starts[-1] == n_windows - 1 and np.all(np.diff(starts) >= 1), starts
    assert np.ptp(np.diff(starts)) <= 1, starts     # evenly spaced
    assert validation_set(small, 3, 16).shape == (1, 17)  # at least one sequence
    assert bytes_per_token(small, v) == 1.0
    with pytest.raises(SuiteError, match="lower eval_tokens"):
        validation_set(small, len(small.val) + 100, 16)


def test_validation_set_samples_many_documents(tmp_path):
    big = load_data(str(corpus_dir(tmp_path, n=2000)))
    val = big.val.astype(np.int64)
    marker = np.frombuffer(b"document ", dtype=np.uint8).astype(np.int64)
    doc_starts = [i for i in range(len(val) - len(marker)) if np.array_equal(val[i:i + len(marker)], marker)]
    spread = validation_set(big, 40 * 17, 16)
    starts = [next(j for j in range(0, len(val), 17) if np.array_equal(val[j:j + 17], w)) for w in spread.numpy()]
    docs_spread = set(np.searchsorted(doc_starts, starts, side="right"))
    docs_head = set(np.searchsorted(doc_starts, np.arange(0, spread.numel(), 17), side="right"))
    assert len(docs_spread) > 3 * len(docs_head), (len(docs_spread), len(docs_head), big.n_docs_val)


def test_train_batch(small):
    a = train_batch(small, seed=1, step=5, batch_size=4, context=32)
    assert a.shape == (4, 33) and a.dtype == torch.int64
    assert torch.equal(a, train_batch(small, 1, 5, 4, 32))
    assert not torch.equal(a, train_batch(small, 1, 6, 4, 32))
    assert not torch.equal(a, train_batch(small, 2, 5, 4, 32))
    # rows are contiguous windows of train at the offsets the spec's rng draws
    starts = np.random.default_rng([1, 5]).integers(0, len(small.train) - 32, size=4)
    for row, s in zip(a, starts):
        assert torch.equal(row, torch.from_numpy(small.train[s:s + 33].astype(np.int64)))


# -------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset="wikipedia"), "unknown dataset 'wikipedia': expected 'stdlib'"),
    (dict(dataset="./no/such/dir"), "does not exist"),
    (dict(dataset="nosuch*.txt"), "no .txt, .jsonl or .parquet files"),
    (dict(dataset="hf:"), "empty dataset name"),
    (dict(tokenizer="bpe", vocab_size=70000), "vocab_size <= 65535"),
    (dict(tokenizer="bpe", vocab_size=256), "257 <= vocab_size"),
    (dict(tokenizer="byte", vocab_size=512), "tokenizer=byte has vocab_size 256"),
    (dict(tokenizer="wordpiece"), "unknown tokenizer"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(SuiteError, match=match) as e:
        load_data(**kwargs)
    assert "\n" not in str(e.value)


def test_empty_corpus_and_bad_records(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("")
    (tmp_path / "e" / "b.txt").write_text("")
    with pytest.raises(SuiteError, match="is empty"):
        load_data(str(tmp_path / "e"))
    (tmp_path / "x").mkdir()
    with pytest.raises(SuiteError, match="no .txt"):
        load_data(str(tmp_path / "x"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SuiteError, match=r"bad.jsonl:2: expected a JSON object"):
        load_data(str(tmp_path / "bad.jsonl"))
    pq.write_table(pa.table({"body": ["x"], "title": ["y"]}), tmp_path / "bad.parquet")
    # a7e3e38 said only "index out of bounds": the message names the columns there are.
    with pytest.raises(SuiteError, match="no 'text' column; its columns: body, title") as e:
        load_data(str(tmp_path / "bad.parquet"))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ cache

@pytest.mark.parametrize("damage", ["truncate", "meta", "no_meta", "token"])
def test_corrupt_cache_is_refused_then_rebuilt(tmp_path, cache, damage):
    root = corpus_dir(tmp_path)
    good = load_data(str(root))
    train, val = np.array(good.train), np.array(good.val)
    d = cache / good.digest
    del good  # drop the memmaps before damaging the files
    if damage == "truncate":
        with open(d / "train.bin", "r+b") as f:
            f.truncate(100)
    elif damage == "meta":
        (d / "meta.json").write_text("{not json")
    elif damage == "no_meta":
        (d / "meta.json").unlink()
    else:
        m = np.memmap(d / "val.bin", dtype=np.uint16, mode="r+")
        m[0] = 60000
        m.flush()
        del m
    with pytest.raises(SuiteError, match=r"token cache .* is corrupt .*delete it") as e:
        load_data(str(root))
    assert "\n" not in str(e.value)
    shutil.rmtree(d)  # what the message tells the user to do
    again = load_data(str(root))
    assert np.array_equal(again.train, train) and np.array_equal(again.val, val)


def test_one_bad_token_anywhere_is_found_at_load(tmp_path, cache):
    """a7e3e38 checked the ends and a sample of 65,536 positions: a bad id elsewhere passed the load
    and stopped the run mid-way with an IndexError in the embedding."""
    (tmp_path / "big.txt").write_text("".join(f"line {i}: some text to tokenize\n" for i in range(12000)))
    good = load_data(str(tmp_path / "big.txt"))
    n, d = len(good.train), cache / good.digest
    del good
    sampled = set(np.arange(4096)) | set(np.arange(n - 4096, n)) | set(np.random.default_rng(0).integers(0, n, 65536))
    pos = next(i for i in range(n // 2, n) if i not in sampled)
    m = np.memmap(d / "train.bin", dtype=np.uint16, mode="r+")
    m[pos] = 300                     # >= vocab_size 256
    m.flush()
    del m
    with pytest.raises(SuiteError, match=f"token id 300 >= vocab_size 256 at position {pos}") as e:
        load_data(str(tmp_path / "big.txt"))
    assert "\n" not in str(e.value)


def test_failed_build_leaves_no_cache(tmp_path, cache, monkeypatch):
    root = corpus_dir(tmp_path)
    real = D._write_tokens

    def dies_on_val(tok, texts, path):
        if path.name == "val.bin":
            raise KeyboardInterrupt  # like a process killed mid-build
        return real(tok, texts, path)
    monkeypatch.setattr(D, "_write_tokens", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        load_data(str(root))
    # Only the content-digest memo (corpus.digest_files) may be there: no token cache, whole or not.
    assert not cache.exists() or [x.name for x in cache.iterdir()] in ([], ["content_digests.json"])
    monkeypatch.setattr(D, "_write_tokens", real)
    assert len(load_data(str(root)).val) > 0


def test_killed_build_leaves_no_valid_looking_cache(tmp_path, cache):
    import signal
    import subprocess
    import sys
    root = corpus_dir(tmp_path)
    code = (
        "import time, scaling_suite.data as D\n"
        "real = D._write_tokens\n"
        "def slow(tok, texts, path):\n"
        "    n = real(tok, texts, path)\n"
        "    print('wrote', path.name, flush=True)\n"
        "    time.sleep(60)\n"
        "    return n\n"
        "D._write_tokens = slow\n"
        f"D.load_data({str(root)!r})\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, SCALING_SUITE_CACHE=str(cache)))
    try:
        assert p.stdout.readline().strip() == "wrote train.bin"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # only the hidden temp dir (and the content-digest memo, corpus.digest_files)
    assert [x.name.startswith(".tmp-") for x in cache.iterdir() if x.name != "content_digests.json"] == [True]
    d = load_data(str(root))
    assert len(d.val) > 0 and [x.name for x in cache.iterdir() if x.name != "content_digests.json"] == [d.digest]  # stale temp removed
