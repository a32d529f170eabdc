"""Start-up cost of a run's content fingerprint on a multi-GB checkpoint: every file hashed vs the hash cache.

    python -m bench.bench_fingerprint                 # a 4 GiB checkpoint folder (2 weight shards) in a temp dir
    python -m bench.bench_fingerprint --gib 13 --dir /scratch   # 7B-sized

Times ``univ.run.identity``'s file hashing three ways: the cache off (what every start and resume paid before),
the cache cold (first start: hash + write the cache), the cache warm (a resume: one stat per file). The page
cache is warm for all three (the files were just written), so "off" is the hashing floor, not a disk read.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from univ.run import hashes


def _write(folder: Path, gib: float, shards: int) -> list[Path]:
    chunk = os.urandom(64 << 20)
    per = int(gib * (1 << 30)) // shards
    paths = []
    for i in range(shards):
        p = folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with open(p, "wb") as f:
            left = per
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= len(chunk)
        paths.append(p)
    old = time.time() - 60  # as a downloaded checkpoint is: not written within the racy window
    for p in paths:
        os.utime(p, (old, old))
    return paths


def _time(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    hashes.sha256_many(paths)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.0, help="checkpoint size in GiB (default 4)")
    ap.add_argument("--shards", type=int, default=2, help="weight files (default 2)")
    ap.add_argument("--dir", default=None, help="where to write it (default: a temp dir)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        paths = _write(folder, args.gib, args.shards)
        os.environ["UNIV_HASH_CACHE"] = "off"
        off = _time(paths)
        os.environ["UNIV_HASH_CACHE"] = str(folder / "hashes.json")
        cold = _time(paths)
        warm = min(_time(paths) for _ in range(3))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.gib:g} GiB in {args.shards} files")
    print(f"{'cache':<8}{'seconds':>10}{'GiB/s':>8}")
    for name, s in (("off", off), ("cold", cold), ("warm", warm)):
        print(f"{name:<8}{s:>10.4f}{args.gib / s:>12.2f}")
    print(f"warm start-up: {off / warm:,.0f}x faster than hashing every file")


if __name__ == "__main__":
    main()
