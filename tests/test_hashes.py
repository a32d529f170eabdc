"""The content-hash cache: reused only while a file's stat is unchanged, so changed content is always rehashed."""

import json
import os
import time

import pytest

from univ.run import hashes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    where = tmp_path / "cache" / "hashes.json"
    monkeypatch.setenv("UNIV_HASH_CACHE", str(where))
    monkeypatch.setattr(hashes, "RACY_S", 0.0)
    reads = []
    real = hashes.file_sha256

    def counting(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(hashes, "file_sha256", counting)
    return where, reads


def _old(path, seconds=10):
    """Back-date mtime as a file written a while ago has it (the cache skips files written just now)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_second_hash_comes_from_the_cache(tmp_path, cache):
    where, reads = cache
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1000))
    _old(f)
    first = hashes.sha256_many([f])[f]
    assert first == hashes.hashlib.sha256(f.read_bytes()).hexdigest()
    assert hashes.sha256_many([f])[f] == first
    assert len(reads) == 1 and where.exists()


def test_changed_content_is_rehashed_even_with_the_same_size_and_mtime(tmp_path, cache):
    _, reads = cache
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    _old(f)
    st = f.stat()
    first = hashes.sha256_many([f])[f]
    time.sleep(0.01)
    f.write_bytes(b"b" * 100)  # same size; mtime put back: only ctime tells
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = hashes.sha256_many([f])[f]
    assert second != first and second == hashes.hashlib.sha256(b"b" * 100).hexdigest()
    assert len(reads) == 2


def test_a_file_renamed_over_the_path_is_rehashed(tmp_path, cache):
    _, reads = cache
    f, g = tmp_path / "w.bin", tmp_path / "new.bin"
    f.write_bytes(b"a" * 64)
    _old(f)
    hashes.sha256_many([f])
    g.write_bytes(b"c" * 64)
    os.utime(g, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    os.replace(g, f)  # new inode behind the same path
    assert hashes.sha256_many([f])[f] == hashes.hashlib.sha256(b"c" * 64).hexdigest()
    assert len(reads) == 2


def test_a_file_written_just_now_is_not_cached(tmp_path, cache, monkeypatch):
    where, reads = cache
    monkeypatch.setattr(hashes, "RACY_S", 60.0)
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    hashes.sha256_many([f])
    hashes.sha256_many([f])
    assert len(reads) == 2


@pytest.mark.parametrize("content", ["{not json", '{"format": "other", "files": {}}', '["a list"]',
                                     '{"format": "univ-hashes/1", "files": {"X": 3}}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path, cache, content):
    where, reads = cache
    f = tmp_path / "w.bin"
    f.write_bytes(b"data")
    _old(f)
    where.parent.mkdir(parents=True)
    where.write_text(content.replace("X", str(f.resolve())))
    assert hashes.sha256_many([f])[f] == hashes.hashlib.sha256(b"data").hexdigest()
    assert json.loads(where.read_text())["format"] == hashes.FORMAT
    hashes.sha256_many([f])
    assert len(reads) == 1


def test_off_and_unwritable(tmp_path, cache, monkeypatch):
    _, reads = cache
    f = tmp_path / "w.bin"
    f.write_bytes(b"data")
    _old(f)
    monkeypatch.setenv("UNIV_HASH_CACHE", "off")
    hashes.sha256_many([f])
    hashes.sha256_many([f])
    assert len(reads) == 2
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("UNIV_HASH_CACHE", str(blocker / "sub" / "hashes.json"))  # cannot be created
    assert hashes.sha256_many([f])[f] == hashes.hashlib.sha256(b"data").hexdigest()
