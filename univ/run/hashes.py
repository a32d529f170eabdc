"""Content hashes of the run's input files, cached by what any change of content changes (as git's index does).

A run fingerprints every weight and data file by sha256 on each start and resume (13 GB of weights at 7B is
a minute of hashing). A file's hash is kept in ``$UNIV_CACHE/hashes.json`` with its resolved path, size,
mtime_ns, ctime_ns, inode and device; it is reused only while all of these are unchanged, so new content
behind an unchanged path (an overwrite, a rename over it, a restored mtime: ctime still moves) is hashed
again and a resume still refuses it. A file modified within ``RACY_S`` seconds of being hashed is not cached:
its mtime may not yet tell a later write within the filesystem's timestamp granularity apart ("racy git").

The cache is advisory: unreadable or corrupt, it is ignored and rewritten; ``UNIV_HASH_CACHE=off`` disables
it, ``UNIV_HASH_CACHE=FILE`` moves it. Writes are atomic (a kill leaves the previous cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

HASH_CHUNK = 16 << 20
RACY_S = 2.0
MAX_ENTRIES = 4096
FORMAT = "univ-hashes/1"


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, always read (no cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_file() -> Path | None:
    """Where the cache lives, or None when it is switched off."""
    where = os.environ.get("UNIV_HASH_CACHE")
    if where == "off":
        return None
    if where:
        return Path(where)
    return Path(os.environ.get("UNIV_CACHE") or Path.home() / ".cache" / "univ") / "hashes.json"


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _save(path: Path, entries: dict) -> None:
    if len(entries) > MAX_ENTRIES:  # keep the most recently hashed
        entries = dict(sorted(entries.items(), key=lambda kv: kv[1].get("at", 0))[-MAX_ENTRIES:])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # temp + rename (not the run's checked writes: a cache is no output, and a full disk only skips it)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": FORMAT, "files": entries}))
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache folder only costs the next start a rehash
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def sha256_many(paths: Iterable[Path]) -> dict[Path, str]:
    """sha256 of each file, from the cache where its stat is unchanged; the cache is read and written once."""
    paths = list(paths)
    where = cache_file()
    if where is None:
        return {p: file_sha256(p) for p in paths}
    entries = _load(where)
    out: dict[Path, str] = {}
    dirty = False
    for p in paths:
        key = str(Path(p).resolve())
        before = os.stat(key)
        hit = entries.get(key)
        if isinstance(hit, dict) and hit.get("stat") == _stamp(before) and isinstance(hit.get("sha256"), str):
            out[p] = hit["sha256"]
            continue
        digest = file_sha256(Path(key))
        after = os.stat(key)
        out[p] = digest
        racy = time.time() - after.st_mtime_ns / 1e9 < RACY_S
        if _stamp(after) == _stamp(before) and not racy:
            entries[key] = {"stat": _stamp(after), "sha256": digest, "at": time.time()}
            dirty = True
        elif entries.pop(key, None) is not None:
            dirty = True
    if dirty:
        _save(where, entries)
    return out
