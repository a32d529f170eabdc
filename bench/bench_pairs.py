"""Candidate pairs vs the dense update: time per batch, and throughput per useful FLOP.

    python -m bench.bench_pairs                         # CPU, torch backend: T 2,048, 3,072 x 3,072, k 8/32/128
    python -m bench.bench_pairs --n 36864 --tokens 16384 --backend triton   # on a GPU

The dense co-moment update computes every pair (2·T·n_a·n_b FLOPs); the gathered one only n_a·k of them
(2·T·n_a·k). "useful GFLOP/s" counts the gathered kernel's own FLOPs; "x dense" = dense time / gathered time,
the speed-up a screen that names k candidates per row buys in the exact pass; "FLOP efficiency" = gathered
GFLOP/s / dense GFLOP/s, the price of a gather (no tensor-core or BLAS form). Providers run round-robin
(``bench.common.measure``).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from bench.common import measure


def main(argv: list[str] | None = None) -> None:
    from univ_kernels import comoment_update, gathered_comoment_update

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3072, help="neurons per side")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--k", default="8,32,128", help="candidates per row, comma-separated")
    ap.add_argument("--backend", default="torch", choices=["torch", "triton"])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    device = "cuda" if args.backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(args.tokens, args.n, generator=g, device=device)
    b = torch.randn(args.tokens, args.n, generator=g, device=device)
    dense_c = torch.zeros(args.n, args.n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def dense() -> None:
        comoment_update(dense_c, a, b, backend=args.backend)
        sync()

    runs = {"dense": dense}
    ks = [int(k) for k in args.k.split(",")]
    for k in ks:
        cand = torch.randint(0, args.n, (args.n, k), generator=g, device=device)
        c = torch.zeros(args.n, k, device=device)

        def gathered(c=c, cand=cand) -> None:
            gathered_comoment_update(c, a, b, cand, backend=args.backend)
            sync()

        runs[f"k={k}"] = gathered
    t = measure(runs, reps=args.reps)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {device}, backend {args.backend}")
    dense_flops = 2 * args.tokens * args.n * args.n
    dense_rate = dense_flops / t["dense"].median / 1e9
    print(f"T {args.tokens:,}, {args.n:,} x {args.n:,}; dense: {1e3 * t['dense'].median:.1f} ms, "
          f"{dense_rate:.1f} GFLOP/s")
    print(f"{'k':>6}{'ms':>10}{'useful GFLOP/s':>16}{'x dense':>10}{'FLOP efficiency':>17}")
    for k in ks:
        s = t[f"k={k}"].median
        rate = 2 * args.tokens * args.n * k / s / 1e9
        print(f"{k:>6}{1e3 * s:>10.1f}{rate:>16.2f}{t['dense'].median / s:>10.1f}{rate / dense_rate:>17.3f}")


if __name__ == "__main__":
    main()
