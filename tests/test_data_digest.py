"""The content digest is remembered by (name, size, mtime) and recomputed when a file changes."""

import os
from pathlib import Path

from scaling_suite import corpus
from scaling_suite import data as D


def test_content_digest_is_remembered_and_follows_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_SUITE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("alpha " * 100)
    (root / "b.txt").write_text("beta " * 100)
    rels = ["a.txt", "b.txt"]
    first = corpus.digest_files(root, rels)
    assert (tmp_path / "cache" / "content_digests.json").exists()

    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real(self))
    assert corpus.digest_files(root, rels) == first
    assert reads == [], "an unchanged corpus is not read again"

    # Same size, other bytes, a later mtime: a new key, so the files are hashed again.
    (root / "a.txt").write_text("ALPHA " * 100)
    st = os.stat(root / "a.txt")
    os.utime(root / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = corpus.digest_files(root, rels)
    assert reads and changed != first

    # A damaged memo is ignored, not trusted: the digest is recomputed.
    (tmp_path / "cache" / "content_digests.json").write_text("{not json")
    assert corpus.digest_files(root, rels) == changed


def test_hf_digest_follows_the_data_files(tmp_path, monkeypatch, token_cache):
    """An hf: source is identified by its Arrow files relative to the datasets cache (public
    `cache_files`): the same files give the same digest, other text another digest."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    d = tmp_path / "hfdata"
    d.mkdir()
    pq.write_table(pa.table({"text": [f"train {i}" for i in range(200)]}), d / "train-00000-of-00001.parquet")
    first = D.load_data(f"hf:{d}")
    assert D.load_data(f"hf:{d}").content_digest == first.content_digest
    pq.write_table(pa.table({"text": [f"other {i}" for i in range(200)]}), d / "train-00000-of-00001.parquet")
    assert D.load_data(f"hf:{d}").content_digest != first.content_digest


def test_cache_records_are_written_whole_and_read_defensively(tmp_path):
    """cache.write_json: one atomic JSON writer (the digest memo, the compile warm-ups); a record
    that is missing, damaged or not an object reads as {}; an unwritable place is False, no error."""
    from scaling_suite import cache
    path = tmp_path / "sub" / "record.json"
    assert cache.read_json(path) == {}
    assert cache.write_json(path, {"b": 2, "a": 1}) and cache.read_json(path) == {"a": 1, "b": 2}
    assert list(path.parent.iterdir()) == [path], "no temporary file left behind"
    path.write_text("[1, 2]")
    assert cache.read_json(path) == {}
    (tmp_path / "a_file").write_text("")
    assert cache.write_json(tmp_path / "a_file" / "record.json", {"a": 1}) is False
