"""Cost of per-batch centring: ``StreamingCorrelation.update`` time at T × n × n, for whatever univ_kernels is
on PYTHONPATH (run it once per tree, alternating, to compare two versions), plus the error in r of a stream
whose first batch sits 100 σ off the rest.

    PYTHONPATH=. python bench/bench_centring.py --sizes 1024,2048,3072 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from univ_kernels import StreamingCorrelation


def time_update(t: int, n: int, reps: int) -> tuple[float, float]:
    """Median wall and median CPU (process) seconds of one update (both sides n columns, T = t tokens).

    CPU time is the work done, which a loaded machine's scheduling does not stretch as much as wall time.
    """
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(t, n, generator=g) + 3, torch.randn(t, n, generator=g) - 1) for _ in range(2)]
    corr = StreamingCorrelation(n, n, backend="torch")
    corr.update(*batches[0])  # the first batch: allocations, no merge term
    wall, cpu = [], []
    for i in range(reps):
        x_a, x_b = batches[i % 2]
        t0, c0 = time.perf_counter(), time.process_time()
        corr.update(x_a, x_b)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def error_100_sigma(first: int = 2, rest: int = 20000, batch: int = 1000, n: int = 64) -> float:
    """max |Δr| against float64 when the first ``first`` tokens sit 100 column stds off the rest."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(first + rest, 8, generator=g, dtype=torch.float64)
    x = [z @ torch.randn(8, n, generator=g, dtype=torch.float64) + torch.randn(first + rest, n, generator=g,
                                                                               dtype=torch.float64) + 2.0
         for _ in range(2)]  # fmt: skip
    for xi in x:
        xi[:first] += 100 * xi.std(0) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    xa, xb = (xi.float() for xi in x)
    corr = StreamingCorrelation(n, n, backend="torch")
    corr.update(xa[:first], xb[:first])
    for t0 in range(first, first + rest, batch):
        corr.update(xa[t0 : t0 + batch], xb[t0 : t0 + batch])
    a, b = (xi.double().numpy() for xi in (xa, xb))
    a, b = a - a.mean(0), b - b.mean(0)
    ref = (a.T @ b) / np.outer(np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0)))
    return float(np.abs(corr.correlation().numpy() - ref).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--t", type=int, default=2048)
    p.add_argument("--sizes", default="1024,2048,3072")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-accuracy", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n in (int(s) for s in args.sizes.split(",")):
        wall, cpu = time_update(args.t, n, args.reps)
        print(f"update T={args.t} n={n}: median wall {wall * 1e3:8.1f} ms  median CPU {cpu * 1e3:8.1f} ms")
    if not args.no_accuracy:
        print(f"100-sigma first batch: max |dr| vs float64 = {error_100_sigma():.2e}")


if __name__ == "__main__":
    main()
