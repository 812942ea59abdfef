"""The content digest is remembered by (name, size, mtime) and recomputed when a file changes."""

import os
from pathlib import Path

from scaling_suite import data as D


def test_content_digest_is_remembered_and_follows_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_SUITE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("alpha " * 100)
    (root / "b.txt").write_text("beta " * 100)
    rels = ["a.txt", "b.txt"]
    first = D._digest_files(root, rels)
    assert (tmp_path / "cache" / "content_digests.json").exists()

    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real(self))
    assert D._digest_files(root, rels) == first
    assert reads == [], "an unchanged corpus is not read again"

    # Same size, other bytes, a later mtime: a new key, so the files are hashed again.
    (root / "a.txt").write_text("ALPHA " * 100)
    st = os.stat(root / "a.txt")
    os.utime(root / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = D._digest_files(root, rels)
    assert reads and changed != first

    # A damaged memo is ignored, not trusted: the digest is recomputed.
    (tmp_path / "cache" / "content_digests.json").write_text("{not json")
    assert D._digest_files(root, rels) == changed
