"""Does the memory plan hold? One ``univ correlate`` per geometry in a fresh process: planned vs measured peak.

    python -m bench.bench_memory                     # the zoo (3 seeds) and GPT2-small geometry (2 seeds) on CPU
    python -m bench.bench_memory --sizes zoo --ranks 1,2    # one process and two ranks (torchrun, gloo)

Each row is its own process (``ru_maxrss`` is a high-water mark for the life of a process), random-initialised
GPT-2 seeds (memory does not depend on training), reference mode, the Gaussian baseline. Columns come from the
run's run.json ``memory``: ``planned_peak_bytes`` (printed before streaming) and ``measured_peak_bytes``. The goal
is measured within 10 % of the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_correlate import SIZES, make_seeds

DEFAULTS = {"zoo": {"seeds": 3, "tokens": 20_000, "batch_size": 16, "draws": 16},
            "small": {"seeds": 2, "tokens": 2_048, "batch_size": 4, "draws": 1}}


def one(size: str, tokens: int | None = None, ranks: int = 1) -> list[dict]:
    from univ.corpus import write_corpus_files

    d = DEFAULTS[size]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seeds = make_seeds(root, d["seeds"], size)
        data = write_corpus_files(root, "heldout")
        out = root / "run"
        launcher = [sys.executable] if ranks == 1 else [str(Path(sys.executable).with_name("torchrun")),
                                                        "--standalone", "--nproc-per-node", str(ranks)]
        cmd = [*launcher, "-m", "univ", "correlate", *map(str, seeds), "--data", str(data), "--out", str(out),
               "--tokens", str(tokens or d["tokens"]), "--ctx", str(SIZES[size][4]), "--batch-size",
               str(d["batch_size"]), "--baseline-draws", str(d["draws"])]
        if ranks > 1:
            cmd += ["--device", "cpu", "--token-shards", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        run = json.loads((out / "run.json").read_text())
    per_rank = run["memory"].get("per_rank") or [run["memory"]]
    return [{"size": size, "rank": f"{r}/{ranks}", "seeds": d["seeds"], "tokens": run["tokens"], "draws": d["draws"],
             "planned": m["planned_peak_bytes"], "measured": m["measured_peak_bytes"]} for r, m in enumerate(per_rank)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="zoo,small", help="comma-separated geometries (default zoo,small)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per run (default: per size)")
    ap.add_argument("--ranks", default="1", help="comma-separated world sizes (>1: torchrun, gloo; default 1)")
    args = ap.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'size':<6}{'rank':>6}{'seeds':>6}{'tokens':>8}{'draws':>6}{'planned GB':>12}{'measured GB':>13}"
          f"{'ratio':>7}  goal")
    for size in args.sizes.split(","):
        for ranks in map(int, args.ranks.split(",")):
            for r in one(size, args.tokens, ranks):
                ratio = r["measured"] / r["planned"]
                print(f"{r['size']:<6}{r['rank']:>6}{r['seeds']:>6}{r['tokens']:>8}{r['draws']:>6}"
                      f"{r['planned'] / 1e9:>12.2f}{r['measured'] / 1e9:>13.2f}{ratio:>7.2f}  "
                      f"{'PASS' if abs(ratio - 1) <= 0.10 else 'FAIL'}", flush=True)


if __name__ == "__main__":
    main()
